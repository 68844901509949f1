using System.Reflection;
using Microsoft.CodeAnalysis;
using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Commands.Train;
using Xunit;

namespace Moe.Generators.Tests;

/// <summary>
/// The generated <c>Wiring.Layout</c>: the shipped recipes' (compiled by their own build) against <see cref="RankLayout"/>,
/// which the Megatron vectors verify; the override path a run takes at start-up; and recipes of 8192, 65,536 and
/// 100,000 GPUs, which get the computed form.
/// </summary>
public sealed class WiringLayoutTests
{
    private static string RecipeSource(string name) => File.ReadAllText(Path.Combine(Moe.Tests.TestPaths.RepoRoot, "recipes", name, name + ".cs"));

    private static (IRankLayout Wiring, RecipeSettings Settings) Shipped(string recipe) => recipe switch
    {
        "TinyMixtral" => (Moe.Recipes.TinyMixtral.Wiring.Layout, new Moe.Recipes.TinyMixtral().ToSettings()),
        "Mixtral8x7b" => (Moe.Recipes.Mixtral8x7b.Wiring.Layout, new Moe.Recipes.Mixtral8x7b().ToSettings()),
        "Mixtral8x22b" => (Moe.Recipes.Mixtral8x22b.Wiring.Layout, new Moe.Recipes.Mixtral8x22b().ToSettings()),
        _ => throw new ArgumentException(recipe),
    };

    private static RankLayout Computed(Parallelism p) => new(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);

    [Theory]
    [InlineData("TinyMixtral")]
    [InlineData("Mixtral8x7b")]
    [InlineData("Mixtral8x22b")]
    public void ShippedRecipe_WiringLayout_EqualsRankLayoutInEveryLookup(string recipe)
    {
        var (wiring, settings) = Shipped(recipe);
        Assert.IsType<TabulatedRankLayout>(wiring);
        Assert.Empty(LayoutEquality.Differences(Computed(settings.Parallelism), wiring));
    }

    [Fact]
    public void Mixtral8x22bWiringLayout_EqualsMegatronsVector()
    {
        // 32 GPUs, TP 2, PP 2, EP 8, ETP = TP, default order: Megatron's own file for that layout.
        Assert.Empty(LayoutEquality.Differences(Moe.Tests.MegatronVectors.Load("w32-tp2-pp2-cp1-ep8-etp2-tp-cp-ep-dp-pp.json"), Moe.Recipes.Mixtral8x22b.Wiring.Layout));
    }

    /// <summary>
    /// The train verb carries the wiring; with the recipe's own topology <see cref="LayoutSource.For"/> returns it,
    /// and after a command-line override it computes a layout equal to the wiring generated for the overridden recipe.
    /// </summary>
    [Theory]
    [InlineData("TinyMixtral", new[] { "--gpus", "4", "--ep", "4", "--micro-batch-size", "2" }, "new() { Gpus = 1 }", "new() { Gpus = 4, Expert = 4 }", "MicroBatchSize = 8,", "MicroBatchSize = 2,")]
    [InlineData("Mixtral8x7b", new[] { "--gpus", "64" }, "Gpus = 32,", "Gpus = 64,", null, null)]
    [InlineData("Mixtral8x22b", new[] { "--ep", "4" }, "Expert = 8,", "Expert = 4,", null, null)]
    public void ShippedRecipe_CommandLineOverride_GetsTheOverriddenRecipesLayout(string recipe, string[] args, string from, string to, string? from2, string? to2)
    {
        var (wiring, settings) = Shipped(recipe);
        var train = new TrainCommandDefinition(settings, wiring);
        Assert.Same(wiring, train.Wiring);
        Assert.Same(wiring, LayoutSource.For(train.Options.Apply(settings, train.Command.Parse([])), train.Wiring));

        var overridden = LayoutSource.For(train.Options.Apply(settings, train.Command.Parse(args)), train.Wiring);
        Assert.IsType<RankLayout>(overridden);

        string source = RecipeSource(recipe);
        string edited = source.Replace(from, to);
        if (from2 is not null) edited = edited.Replace(from2, to2);
        Assert.NotEqual(source, edited);
        var fresh = (IRankLayout)GeneratorHarness.RunAndLoad(edited).GetType($"Moe.Recipes.{recipe}+Wiring")!
            .GetProperty("Layout", BindingFlags.Public | BindingFlags.Static)!.GetValue(null)!;
        Assert.Empty(LayoutEquality.Differences(fresh, overridden));
        Assert.NotEmpty(LayoutEquality.Differences(wiring, overridden));
    }

    /// <summary>
    /// Recipes far above the table limit, with Mixtral shapes the rule set accepts. Expected sizes and strides by hand:
    /// 8192 = TP 2 · PP 4 · DP 1024, = ETP 2 · EP 8 · PP 4 · EDP 128; 65,536 = TP 8 · PP 8 · DP 1024 = ETP 1 · EP 8 · PP 8 · EDP 1024
    /// (tp-cp-ep-pp-dp needs DP = EDP); 100,000 = TP 4 · PP 4 · DP 6250 = ETP 1 · EP 8 · PP 4 · EDP 3125.
    /// </summary>
    [Theory]
    [InlineData("Mixtral8x7B", 8192, 2, 4, 8, 2, "TpCpEpDpPp", 2048, 1024, 128,
        "new GridAxis(\"dp\", 1024, 2),|new GridAxis(\"pp\", 4, 2048));|new GridAxis(\"ep\", 8, 2),|new GridAxis(\"dp\", 128, 16),")]
    [InlineData("Mixtral8x22B", 65536, 8, 8, 8, 1, "TpCpEpPpDp", 1024, 1024, 1024,
        "new GridAxis(\"pp\", 8, 8),|new GridAxis(\"dp\", 1024, 64));|new GridAxis(\"ep\", 8, 1),|new GridAxis(\"pp\", 8, 8),")]
    [InlineData("Mixtral8x22B", 100000, 4, 4, 8, 1, "TpCpEpDpPp", 12500, 6250, 3125,
        "new GridAxis(\"dp\", 6250, 4),|new GridAxis(\"pp\", 4, 25000));|new GridAxis(\"dp\", 3125, 8),")]
    public void HugeRecipe_GetsTheComputedWiring(string model, int gpus, int tp, int pp, int ep, int etp, string order, int globalBatch, int dp, int edp, string gridLines)
    {
        string source = $$"""
            using Moe.Dsl;
            using Moe.Dsl.Layout;

            namespace Moe.Recipes;

            [Recipe]
            public sealed partial class Huge : Recipe
            {
                public override Model Model => Model.{{model}};

                public override Parallelism Parallelism => new()
                {
                    Gpus = {{gpus}}, Tensor = {{tp}}, Pipeline = {{pp}}, Expert = {{ep}}, ExpertTensor = {{etp}},
                    SequenceParallel = true, Order = RankOrder.{{order}},
                };

                public override Data Data => new() { Prefix = "data/text_document" };

                public override Training Training => new() { GlobalBatchSize = {{globalBatch}}, MicroBatchSize = 1 };
            }
            """;
        var assembly = GeneratorHarness.RunAndLoad(OutputKind.ConsoleApplication, out var generated, source);
        string wiringText = generated["Huge.Wiring.g.cs"];
        Assert.DoesNotContain("cannot be decided", wiringText);
        Assert.InRange(wiringText.Length, 1000, 16_000);
        Assert.DoesNotContain("new[] {", wiringText);
        Assert.Contains("public static IRankLayout Layout { get; } = RankLayout.FromGrids(DenseGrid, ExpertGrid);", wiringText);
        foreach (var line in gridLines.Split('|')) Assert.Contains(line, wiringText);
        Assert.Contains("CreateRoot(new global::Moe.Recipes.Huge().ToSettings(), global::Moe.Recipes.Huge.Wiring.Layout), args);", generated["Program.g.cs"]);

        var wiring = assembly.GetType("Moe.Recipes.Huge+Wiring")!;
        Assert.Equal((gpus, dp, edp), (Constant(wiring, "Gpus"), Constant(wiring, "DataParallel"), Constant(wiring, "ExpertDataParallel")));
        Assert.Equal(pp, ((LayerRange[][])wiring.GetField("StageLayers")!.GetValue(null)!).Length);
        Assert.Equal(ep, ((LayerRange[])wiring.GetField("ExpertsOfRank")!.GetValue(null)!).Length);
        var layout = (IRankLayout)wiring.GetProperty("Layout", BindingFlags.Public | BindingFlags.Static)!.GetValue(null)!;
        var expected = new RankLayout(gpus, tp, pp, 1, ep, etp, Enum.Parse<RankOrder>(order));
        var random = new Random(gpus);
        var ranks = new[] { 0, 1, gpus / 2, gpus - 1 }.Concat(Enumerable.Range(0, 200).Select(_ => random.Next(gpus)));
        // Every group of every family, the creation order, and each sampled rank's coordinates and groups.
        Assert.Empty(LayoutEquality.Differences(expected, layout, ranks));
    }

    [Fact]
    public void TableLimitRaised_8192Ranks_RendersTheWholeTable()
    {
        // Scriban 7 used to cut its output at 1,048,576 characters and append "...": the 8192-GPU table, then ~2.9 MB,
        // ended mid-token. Output limits are off now; the table arrives whole.
        string source = """
            using Moe.Dsl;

            namespace Moe.Recipes;

            [Recipe(WiringTableLimit = 8192)]
            public sealed partial class Wide : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;

                public override Parallelism Parallelism => new() { Gpus = 8192, Tensor = 2, Pipeline = 4, Expert = 8, SequenceParallel = true };

                public override Data Data => new() { Prefix = "data/text_document" };

                public override Training Training => new() { GlobalBatchSize = 2048, MicroBatchSize = 1 };
            }
            """;
        var driver = GeneratorHarness.Driver().RunGenerators(GeneratorHarness.Compilation(OutputKind.DynamicallyLinkedLibrary, source), TestContext.Current.CancellationToken);
        string text = driver.GetRunResult().Results.Single().GeneratedSources.Single(s => s.HintName == "Wide.Wiring.g.cs").SourceText.ToString();
        Assert.True(text.Length > 1_048_576, $"{text.Length} characters");
        Assert.Contains("new(1, 0, 1023, 3, 1023, 7, 1, 127), // rank 8191", text);
        Assert.EndsWith("        };\n    }\n}\n", text);
    }

    private static int Constant(Type wiring, string name) => (int)wiring.GetField(name, BindingFlags.Public | BindingFlags.Static)!.GetValue(null)!;
}
