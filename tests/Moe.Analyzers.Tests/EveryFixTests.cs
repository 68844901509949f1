using System.Collections.Immutable;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CodeActions;
using Microsoft.CodeAnalysis.CodeFixes;
using Microsoft.CodeAnalysis.CSharp;
using Microsoft.CodeAnalysis.Diagnostics;
using Microsoft.CodeAnalysis.Text;
using Moe.Dsl.Tests.Rules;
using Moe.Dsl.Validation;
using Moe.Generators.Evaluation;
using Xunit;
using RuleSet = Moe.Dsl.Validation.RuleSet;

namespace Moe.Analyzers.Tests;

/// <summary>
/// Before and after for every fix the rule set offers on the rule cases: the recipe is written as source,
/// the code fix for the rule's diagnostic is applied, and the fixed source is evaluated again — the setting
/// now holds the suggested value (or is gone) and the rule no longer fires there.
/// </summary>
public class EveryFixTests
{
    public static TheoryData<RuleCases.Case> FixableCases()
    {
        var data = new TheoryData<RuleCases.Case>();
        foreach (var c in RuleCases.All())
            if (RuleSet.Validate(c.Violating).Any(f => f.Rule.Id == c.Id && f.PrimaryPath == c.Path && f.Fix is not null)) data.Add(c);
        return data;
    }

    [Fact]
    public void MostRulesOfferAFix()
    {
        int count = RuleCases.All().Count(c => RuleSet.Validate(c.Violating).Any(f => f.Rule.Id == c.Id && f.PrimaryPath == c.Path && f.Fix is not null));
        Assert.True(count >= 20, $"only {count} rule cases carry a fix");
    }

    [Theory]
    [MemberData(nameof(FixableCases))]
    public async Task Fix_SetsTheSuggestedValue_AndTheRuleNoLongerFiresThere(RuleCases.Case c)
    {
        var finding = RuleSet.Validate(c.Violating).First(f => f.Rule.Id == c.Id && f.PrimaryPath == c.Path);
        string source = Verify.Usings + RecipeSource.Render(c.Violating, Array.Empty<string>(), out _);
        string fixedSource = await ApplyFix(source, c.Id);

        var compilation = Compile(fixedSource);
        var recipe = compilation.GetTypeByMetadataName("Demo.R")!;
        var after = RecipeEvaluator.Evaluate(recipe, compilation, TestContext.Current.CancellationToken).Settings;
        var fix = finding.Fix!;
        object? value = Lookup(after, fix.Path);
        if (fix.Value is null)
            Assert.Equal(Lookup(new Moe.Dsl.RecipeSettings(), fix.Path), value);
        else
            Assert.Equal(fix.Value, Literal(value));
        Assert.DoesNotContain(RuleSet.Validate(after), f => f.Rule.Id == c.Id && f.PrimaryPath == c.Path && f.Message == finding.Message);
    }

    private static object? Lookup(Moe.Dsl.RecipeSettings s, string path)
    {
        object? o = s;
        foreach (var part in path.Split('.')) o = o?.GetType().GetProperty(part)!.GetValue(o);
        return o;
    }

    private static string Literal(object? v) => v switch
    {
        bool b => b ? "true" : "false",
        int i => i.ToString(System.Globalization.CultureInfo.InvariantCulture),
        Moe.Dsl.Layout.RankOrder o => "Moe.Dsl.Layout.RankOrder." + o,
        Moe.Dsl.ScoreFunction f => "Moe.Dsl.ScoreFunction." + f,
        Moe.Dsl.RecomputeMethod m => "Moe.Dsl.RecomputeMethod." + m,
        Moe.Dsl.RecomputeModules r => "Moe.Dsl.RecomputeModules." + r,
        _ => Convert.ToString(v, System.Globalization.CultureInfo.InvariantCulture) ?? "null",
    };

    private static readonly MetadataReference[] References =
        ((string)AppContext.GetData("TRUSTED_PLATFORM_ASSEMBLIES")!).Split(Path.PathSeparator)
            .Where(p => Path.GetFileName(p).StartsWith("System", StringComparison.Ordinal) || Path.GetFileName(p) is "netstandard.dll" or "mscorlib.dll")
            .Select(p => (MetadataReference)MetadataReference.CreateFromFile(p))
            .Append(MetadataReference.CreateFromFile(typeof(Moe.Dsl.Recipe).Assembly.Location))
            .ToArray();

    private static CSharpCompilation Compile(string source) => CSharpCompilation.Create("Fixed",
        [CSharpSyntaxTree.ParseText(source, new CSharpParseOptions(LanguageVersion.Latest))], References,
        new CSharpCompilationOptions(OutputKind.DynamicallyLinkedLibrary));

    private static async Task<string> ApplyFix(string source, string id)
    {
        using var workspace = new AdhocWorkspace();
        var project = workspace.AddProject("Recipe", LanguageNames.CSharp)
            .WithMetadataReferences(References)
            .WithCompilationOptions(new CSharpCompilationOptions(OutputKind.DynamicallyLinkedLibrary))
            .WithParseOptions(new CSharpParseOptions(LanguageVersion.Latest));
        var document = project.AddDocument("R.cs", SourceText.From(source));
        var compilation = (await document.Project.GetCompilationAsync())!;
        var analyzers = ImmutableArray.Create<DiagnosticAnalyzer>(new TopologyAnalyzer(), new RouterAndCapacityAnalyzer(), new DataAndTrainingAnalyzer(), new MemoryAnalyzer());
        var diagnostics = await compilation.WithAnalyzers(analyzers).GetAnalyzerDiagnosticsAsync();
        var diagnostic = diagnostics.First(d => d.Id == id);
        var actions = new List<CodeAction>();
        var context = new CodeFixContext(document, diagnostic, (a, _) => actions.Add(a), CancellationToken.None);
        await new RecipeSettingCodeFixProvider().RegisterCodeFixesAsync(context);
        var action = Assert.Single(actions);
        var operations = await action.GetOperationsAsync(CancellationToken.None);
        var changed = operations.OfType<ApplyChangesOperation>().Single().ChangedSolution.GetDocument(document.Id)!;
        return (await changed.GetTextAsync()).ToString();
    }
}
