using Microsoft.CodeAnalysis;

namespace Moe.Generators.Tests;

/// <summary>
/// A recipe that does not validate, or whose layout is not known at compile time, still gets its Main
/// and Settings (so the user sees the MOE error from the analyzer or from start-up, never a missing Main),
/// but no layout.
/// </summary>
public sealed class FallbackTests
{
    private const string Header = """
        using Moe.Dsl;

        namespace Moe.Recipes;

        """;

    [Fact]
    public void InvalidRecipe_EmitsFallbackWithFindingAndMain()
    {
        // 8 experts over 3 expert-parallel ranks: MOE0003 (and 32 GPUs do not divide by 3).
        string source = Header + """
            [Recipe]
            public sealed partial class Broken : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => new() { Gpus = 32, Expert = 3 };
            }
            """;
        var (_, output, result) = GeneratorHarness.Run(GeneratorHarness.Compilation(OutputKind.ConsoleApplication, source));
        var sources = GeneratorHarness.Sources(result);

        string wiring = sources["Moe.Recipes.Broken.Wiring.g.cs"];
        Assert.Contains("// MOE0003 [Parallelism.Expert]:", wiring);
        Assert.Contains("public static global::Moe.Dsl.RecipeSettings Settings => new global::Moe.Recipes.Broken().ToSettings();", wiring);
        Assert.DoesNotContain("class Groups", wiring);
        Assert.Contains("public static int Main(string[] args)", sources["Moe.Recipes.Broken.Main.g.cs"]);
        GeneratorHarness.EmitAndLoad(output);
    }

    [Fact]
    public void GpusNotConstant_EmitsFallbackNamingTheSetting()
    {
        string source = Header + """
            [Recipe]
            public sealed partial class FromEnvironment : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => new() { Gpus = int.Parse(System.Environment.GetEnvironmentVariable("GPUS") ?? "8"), Expert = 8 };
            }
            """;
        var (_, output, result) = GeneratorHarness.Run(GeneratorHarness.Compilation(OutputKind.ConsoleApplication, source));
        var sources = GeneratorHarness.Sources(result);

        string wiring = sources["Moe.Recipes.FromEnvironment.Wiring.g.cs"];
        Assert.Contains("these settings are not compile-time constants: Parallelism.Gpus.", wiring);
        Assert.DoesNotContain("class Groups", wiring);
        Assert.True(sources.ContainsKey("Moe.Recipes.FromEnvironment.Main.g.cs"));
        GeneratorHarness.EmitAndLoad(output);
    }

    [Fact]
    public void RecipeInLibrary_GetsWiringWithoutMain()
    {
        var (_, _, result) = GeneratorHarness.Run(GeneratorHarness.Compilation(OutputKind.DynamicallyLinkedLibrary, GeneratorHarness.RecipeSource("TinyMixtral")));

        Assert.Equal(["Moe.Recipes.TinyMixtral.Wiring.g.cs"], GeneratorHarness.Sources(result).Keys);
    }
}
