using System.Collections.Generic;
using System.Collections.Immutable;
using System.Linq;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.Diagnostics;
using Moe.Dsl.Validation;
using RuleSet = Moe.Dsl.Validation.RuleSet;
using Moe.Generators.Evaluation;

namespace Moe.Analyzers;

/// <summary>
/// Runs the rule set on each [Recipe] class and reports every finding of one rule family at the
/// initializer that must change. One analyzer per family; each evaluates only the recipe at hand.
/// </summary>
public abstract class RecipeAnalyzer : DiagnosticAnalyzer
{
    /// <summary>Diagnostic property keys that carry the rule set's fix to the code fix provider.</summary>
    public const string FixPath = "MoeFixPath", FixValue = "MoeFixValue", FixTitle = "MoeFixTitle";

    private readonly RuleCategory _category;

    protected RecipeAnalyzer(RuleCategory category)
    {
        _category = category;
        SupportedDiagnostics = Descriptors.Of(category);
    }

    public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics { get; }

    public override void Initialize(AnalysisContext context)
    {
        context.ConfigureGeneratedCodeAnalysis(GeneratedCodeAnalysisFlags.None);
        context.EnableConcurrentExecution();
        context.RegisterCompilationStartAction(start =>
        {
            var attribute = start.Compilation.GetTypeByMetadataName("Moe.Dsl.RecipeAttribute");
            if (attribute is null) return;
            start.RegisterSymbolAction(symbol => Analyze(symbol, attribute), SymbolKind.NamedType);
        });
    }

    private void Analyze(SymbolAnalysisContext context, INamedTypeSymbol attribute)
    {
        var type = (INamedTypeSymbol)context.Symbol;
        if (!type.GetAttributes().Any(a => SymbolEqualityComparer.Default.Equals(a.AttributeClass, attribute))) return;
        var evaluation = RecipeEvaluator.Evaluate(type, context.Compilation, context.CancellationToken);
        Report(context, evaluation);
    }

    /// <summary>Reports this family's findings.</summary>
    protected virtual void Report(SymbolAnalysisContext context, RecipeEvaluation evaluation)
    {
        foreach (var finding in RuleSet.Validate(evaluation.Settings).Where(f => f.Rule.Category == _category))
        {
            var properties = ImmutableDictionary<string, string?>.Empty;
            if (finding.Fix is { } fix)
                properties = properties.Add(FixPath, fix.Path).Add(FixValue, fix.Value).Add(FixTitle, fix.Title);
            context.ReportDiagnostic(Diagnostic.Create(Descriptors.ById[finding.Rule.Id], evaluation.LocationOf(finding.PrimaryPath), properties, finding.Message));
        }
    }
}

/// <summary>GPU layout against the model: MOE0001–MOE0099.</summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class TopologyAnalyzer : RecipeAnalyzer
{
    public TopologyAnalyzer() : base(RuleCategory.Topology) { }
}

/// <summary>Router, capacity and dispatcher: MOE0100–MOE0199.</summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class RouterAndCapacityAnalyzer : RecipeAnalyzer
{
    public RouterAndCapacityAnalyzer() : base(RuleCategory.RouterAndCapacity) { }
}

/// <summary>Data, batches and optimisation: MOE0200–MOE0299.</summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class DataAndTrainingAnalyzer : RecipeAnalyzer
{
    public DataAndTrainingAnalyzer() : base(RuleCategory.DataAndTraining) { }
}

/// <summary>The plan against the GPU's memory: MOE0300–MOE0399.</summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class MemoryAnalyzer : RecipeAnalyzer
{
    public MemoryAnalyzer() : base(RuleCategory.Memory) { }
}

/// <summary>MOE0902: a setting that is not a compile-time constant, reported once, with the rules that wait for start-up.</summary>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class CheckedAtStartUpAnalyzer : RecipeAnalyzer
{
    public CheckedAtStartUpAnalyzer() : base(RuleCategory.StartUp)
    {
    }

    public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics { get; } =
        ImmutableArray.Create(Descriptors.ById[DiagnosticIds.CheckedAtStartUp]);

    protected override void Report(SymbolAnalysisContext context, RecipeEvaluation evaluation)
    {
        var deferred = RuleSet.Deferred(evaluation.Settings);
        foreach (var unknown in evaluation.Unknown)
        {
            var rules = deferred.Where(d => d.Inputs.Any(i => Overlaps(i, unknown.Path))).Select(d => d.Id).ToArray();
            string which = rules.Length == 0 ? "no rule reads it" : "its rules (" + string.Join(", ", rules) + ") are checked at start-up";
            context.ReportDiagnostic(Diagnostic.Create(Descriptors.ById[DiagnosticIds.CheckedAtStartUp], unknown.Location,
                $"{unknown.Path} is not a compile-time constant ({unknown.Reason}); {which}"));
        }
    }

    private static bool Overlaps(string input, string unknown) =>
        input == unknown || input.StartsWith(unknown + ".", System.StringComparison.Ordinal) || unknown.StartsWith(input + ".", System.StringComparison.Ordinal);
}
