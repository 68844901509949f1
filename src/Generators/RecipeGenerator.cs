using Microsoft.CodeAnalysis;

namespace Moe.Generators;

/// <summary>
/// For each <c>[Recipe]</c> class: a <c>&lt;Recipe&gt;Wiring</c> class holding the recipe's Megatron-Core
/// rank layout as readable data, and, in an executable project, the <c>Main</c> that hosts the moe verbs
/// for the recipe. Reports no diagnostics: the Moe analyzers own them.
/// </summary>
[Generator(LanguageNames.CSharp)]
public sealed partial class RecipeGenerator : IIncrementalGenerator
{
    /// <summary>Names of the tracked pipeline steps, for caching tests.</summary>
    public static class TrackingNames
    {
        public const string RecipeSpec = nameof(RecipeSpec);
        public const string EmitMain = nameof(EmitMain);
        public const string RecipeWithEntryPoint = nameof(RecipeWithEntryPoint);
    }

    public void Initialize(IncrementalGeneratorInitializationContext context)
    {
        IncrementalValuesProvider<RecipeSpec> recipes = context.SyntaxProvider
            .ForAttributeWithMetadataName(
                "Moe.Dsl.RecipeAttribute",
                static (node, _) => node is Microsoft.CodeAnalysis.CSharp.Syntax.ClassDeclarationSyntax,
                static (attributed, cancellationToken) => Parser.Parse(attributed, cancellationToken))
            .WithTrackingName(TrackingNames.RecipeSpec);

        // Only an executable gets a Main; a library of recipes gets the wiring alone.
        IncrementalValueProvider<bool> emitMain = context.CompilationProvider
            .Select(static (compilation, _) => compilation.Options.OutputKind is OutputKind.ConsoleApplication or OutputKind.WindowsApplication)
            .WithTrackingName(TrackingNames.EmitMain);

        var withEntryPoint = recipes.Combine(emitMain).WithTrackingName(TrackingNames.RecipeWithEntryPoint);

        context.RegisterSourceOutput(withEntryPoint, static (output, pair) => Emitter.Emit(output, pair.Left, pair.Right));
    }
}
