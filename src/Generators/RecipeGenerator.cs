using System.Collections.Immutable;
using System.Linq;
using Microsoft.CodeAnalysis;
using Moe.Generators.Specs;

namespace Moe.Generators;

/// <summary>
/// For each [Recipe] class: the recipe's parallel-group wiring (layout constants, Megatron's two rank grids,
/// stage → layers, EP rank → experts, and <c>Wiring.Layout</c>, an IRankLayout: every process-group family,
/// rank ↔ coordinates and the communicator creation order, listed as tables up to
/// <c>[Recipe(WiringTableLimit)]</c> GPUs and computed from the grids above) and, in a recipe console project
/// that references Moe.Runtime, its Main, which hands the recipe and its wiring to the moe verbs. Diagnostics belong to the
/// analyzers; an invalid or run-time-valued recipe gets a fallback that still has a Main, so the user
/// sees the MOE error rather than a missing entry point.
/// </summary>
[Generator(LanguageNames.CSharp)]
public sealed partial class RecipeGenerator : IIncrementalGenerator
{
    /// <summary>Tracking names, watched by the incrementality tests.</summary>
    public const string SpecStep = "RecipeSpec", EntryPointStep = "EntryPoint";

    public void Initialize(IncrementalGeneratorInitializationContext context)
    {
        var specs = context.SyntaxProvider
            .ForAttributeWithMetadataName("Moe.Dsl.RecipeAttribute",
                predicate: static (node, _) => node is Microsoft.CodeAnalysis.CSharp.Syntax.ClassDeclarationSyntax,
                transform: static (ctx, ct) => Parser.Parse((INamedTypeSymbol)ctx.TargetSymbol, ctx.SemanticModel.Compilation, ct))
            .WithTrackingName(SpecStep);

        var entryPoint = context.CompilationProvider
            .Select(static (c, _) => c.Options.OutputKind == OutputKind.ConsoleApplication
                && c.GetTypeByMetadataName("Moe.Runtime.Commands.MoeCommands") is not null)
            .WithTrackingName(EntryPointStep);

        context.RegisterSourceOutput(specs, static (spc, spec) =>
            spc.AddSource($"{spec.ClassName}.Wiring.g.cs", Emitter.Wiring(spec)));

        context.RegisterSourceOutput(specs.Collect().Combine(entryPoint), static (spc, pair) =>
        {
            ImmutableArray<RecipeSpec> all = pair.Left;
            // One recipe per console project gets the entry point; with several, the project chooses its own Main.
            if (pair.Right && all.Length == 1) spc.AddSource("Program.g.cs", Emitter.EntryPoint(all[0]));
        });
    }
}
