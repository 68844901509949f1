using Microsoft.CodeAnalysis;
using Xunit;

namespace Moe.Generators.Tests;

/// <summary>
/// Where the generator cannot or should not emit everything: a layout known only at run time still gets
/// a Main (the runtime validates at start-up), a recipe library gets no Main, and a console project with
/// two recipes leaves the choice of Main to the project.
/// </summary>
public sealed class FallbackTests
{
    private const string Header = """
        using Moe.Dsl;

        namespace Demo;

        """;

    [Fact]
    public void GpusReadAtRunTime_GetsFallbackNamingTheSettingAndStillAMain()
    {
        var generated = GeneratorHarness.Run(Header + """
            [Recipe]
            public sealed partial class FromEnvironment : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => new() { Gpus = int.Parse(System.Environment.GetEnvironmentVariable("GPUS") ?? "8"), Expert = 8 };
            }
            """);

        string wiring = generated["FromEnvironment.Wiring.g.cs"];
        Assert.Contains("Parallelism.Gpus is not a compile-time constant", wiring);
        Assert.DoesNotContain("class Wiring", wiring);
        Assert.Contains("MoeCommands.CreateRoot(new global::Demo.FromEnvironment().ToSettings())", generated["Program.g.cs"]);
    }

    [Fact]
    public void RecipeInALibrary_GetsWiringButNoMain()
    {
        var generated = GeneratorHarness.Run(OutputKind.DynamicallyLinkedLibrary,
            File.ReadAllText(Path.Combine(Moe.Tests.TestPaths.RepoRoot, "recipes", "TinyMixtral", "TinyMixtral.cs")));

        Assert.Equal(["TinyMixtral.Wiring.g.cs"], generated.Keys);
    }

    [Fact]
    public void TwoRecipesInOneConsoleProject_GetWiringButNoMain()
    {
        var generated = GeneratorHarness.Run(Header + """
            [Recipe]
            public sealed partial class First : Recipe
            {
                public override Model Model => Model.TinyMixtral;
            }

            [Recipe]
            public sealed partial class Second : Recipe
            {
                public override Model Model => Model.TinyMixtral;
            }

            public static class Program
            {
                public static int Main() => 0;
            }
            """);

        Assert.Equal(["First.Wiring.g.cs", "Second.Wiring.g.cs"], generated.Keys.Order(StringComparer.Ordinal));
    }
}
