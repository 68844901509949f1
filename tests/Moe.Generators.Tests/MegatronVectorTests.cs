using System.Reflection;
using System.Text.Json;
using Microsoft.CodeAnalysis;
using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Tests;
using Xunit;

namespace Moe.Generators.Tests;

/// <summary>
/// Every layout in Megatron-Core 0.20's own vectors (shared/vectors/megatron-ranks, recorded from
/// initialize_model_parallel) written as a small recipe: the generated groups, coordinates and
/// communicator creation order, compiled and loaded, equal the vector, in the table form and in the computed
/// form, and <see cref="LayoutSource.For"/> keeps the wiring or replaces it as a command-line override would.
/// Both production recipes' layouts have a vector (w32-tp1-pp4-cp1-ep8-etp1 and w32-tp2-pp2-cp1-ep8-etp2), and
/// the set covers both orders, CP, ETP ≠ TP, EP folding over CP, and 128 GPUs.
/// </summary>
public sealed class MegatronVectorTests
{
    public static TheoryData<string> Vectors() => new(MegatronVectors.Files());

    /// <summary>
    /// A recipe with the vector's layout. Mixtral 8x7B's model fits every vector layout (32 layers, 32 heads, 8 KV
    /// heads, 8 experts); SP where TP > 1 and a global batch every DP divides keep the recipe valid, so the wiring
    /// (not the fallback) is emitted.
    /// </summary>
    private static string RecipeSource(string className, string vectorFile, string attribute = "Recipe")
    {
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(MegatronVectors.Folder, vectorFile)));
        var v = json.RootElement;
        int Size(string name) => v.GetProperty(name).GetInt32();
        return $$"""
            [{{attribute}}]
            public sealed partial class {{className}} : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;

                public override Parallelism Parallelism => new()
                {
                    Gpus = {{Size("world")}},
                    Tensor = {{Size("tp")}},
                    Pipeline = {{Size("pp")}},
                    Context = {{Size("cp")}},
                    Expert = {{Size("ep")}},
                    ExpertTensor = {{Size("etp")}},
                    SequenceParallel = {{(Size("tp") > 1 ? "true" : "false")}},
                    Order = RankOrder.{{(v.GetProperty("order").GetString() == "tp-cp-ep-dp-pp" ? "TpCpEpDpPp" : "TpCpEpPpDp")}},
                };

                public override Data Data => new() { Prefix = "data/text_document" };

                public override Training Training => new() { GlobalBatchSize = 1024, MicroBatchSize = 1 };
            }
            """;
    }

    private const string Usings = """
        using Moe.Dsl;
        using Moe.Dsl.Layout;

        namespace Moe.Recipes;

        """;

    /// <summary>
    /// The vector's recipe in both forms and the next vector's recipe, compiled together. The tables equal the
    /// vector; both forms' <c>Layout</c> equal Megatron's vector (read independently of our code) and
    /// <see cref="RankLayout"/>; overriding the recipe's topology with the next vector's makes
    /// <see cref="LayoutSource.For"/> compute a layout equal to that recipe's freshly generated wiring and to
    /// Megatron's next vector.
    /// </summary>
    [Theory]
    [MemberData(nameof(Vectors))]
    public void VectorLayoutAsRecipe_GeneratesMegatronsGroups(string vectorFile)
    {
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(MegatronVectors.Folder, vectorFile)));
        var v = json.RootElement;
        int Size(string name) => v.GetProperty(name).GetInt32();
        var files = MegatronVectors.Files();
        string nextFile = files[(Array.IndexOf(files, vectorFile) + 1) % files.Length];
        string source = Usings
            + RecipeSource("Tabulated", vectorFile) + "\n"
            + RecipeSource("Computed", vectorFile, "Recipe(WiringTableLimit = 0)") + "\n"
            + RecipeSource("Next", nextFile);
        var assembly = GeneratorHarness.RunAndLoad(OutputKind.DynamicallyLinkedLibrary, source);
        var wiring = assembly.GetType("Moe.Recipes.Tabulated+Wiring")
            ?? throw new Xunit.Sdk.XunitException("No Tabulated.Wiring: the fallback was emitted.\n" + string.Join("\n", GeneratorHarness.Run(OutputKind.DynamicallyLinkedLibrary, source).Values));

        Assert.Equal(Size("world"), Constant(wiring, "Gpus"));
        Assert.Equal(Size("dp"), Constant(wiring, "DataParallel"));
        Assert.Equal(Size("edp"), Constant(wiring, "ExpertDataParallel"));
        Assert.Equal(v.GetProperty("order").GetString(), (string)wiring.GetField("Order")!.GetValue(null)!);

        var families = ((string Key, int[][] Groups)[])wiring.GetField("Families")!.GetValue(null)!;
        var expectedFamilies = v.GetProperty("groups").EnumerateObject().ToArray();
        Assert.Equal(expectedFamilies.Select(f => f.Name).Order(StringComparer.Ordinal), families.Select(f => f.Key).Order(StringComparer.Ordinal));
        foreach (var family in expectedFamilies)
        {
            var expected = family.Value.EnumerateArray().Select(g => g.EnumerateArray().Select(r => r.GetInt32()).ToArray()).ToArray();
            Assert.Equal(expected, families.Single(f => f.Key == family.Name).Groups);
        }

        var expectedCoordinates = v.GetProperty("coords").EnumerateArray().Select(c => new RankCoordinates(
            c.GetProperty("tp").GetInt32(), c.GetProperty("cp").GetInt32(), c.GetProperty("dp").GetInt32(), c.GetProperty("pp").GetInt32(),
            c.GetProperty("dp_cp").GetInt32(), c.GetProperty("ep").GetInt32(), c.GetProperty("etp").GetInt32(), c.GetProperty("edp").GetInt32()));
        Assert.Equal(expectedCoordinates, (RankCoordinates[])wiring.GetField("Coordinates")!.GetValue(null)!);

        var expectedCreation = v.GetProperty("creation_order").EnumerateArray().Select(c => new GroupCreation(
            c[0].GetString()!, c[1].GetString()!, c[2].GetString()!, c[3].GetInt32(), c[4].GetInt32()));
        Assert.Equal(expectedCreation, (GroupCreation[])wiring.GetField("CommunicatorCreationOrder")!.GetValue(null)!);

        // The same layout through IRankLayout, in both forms.
        var megatron = MegatronVectors.Load(vectorFile);
        var tabulated = Layout(assembly, "Tabulated");
        Assert.IsType<TabulatedRankLayout>(tabulated);
        Assert.Empty(LayoutEquality.Differences(megatron, tabulated));
        Assert.Empty(LayoutEquality.Differences(new RankLayout(megatron.World, megatron.Tensor, megatron.Pipeline, megatron.Context, megatron.Expert, megatron.ExpertTensor, megatron.Order), tabulated));
        var computed = Layout(assembly, "Computed");
        Assert.IsType<RankLayout>(computed);
        Assert.Null(assembly.GetType("Moe.Recipes.Computed+Wiring")!.GetField("Families"));
        Assert.Empty(LayoutEquality.Differences(megatron, computed));

        // Start-up: the wiring when the topology is the recipe's, else the layout of the overridden topology.
        var settings = Settings(assembly, "Tabulated");
        Assert.Same(tabulated, LayoutSource.For(settings, tabulated));
        Assert.Same(computed, LayoutSource.For(Settings(assembly, "Computed"), computed));
        var overridden = LayoutSource.For(settings with { Parallelism = Settings(assembly, "Next").Parallelism }, tabulated);
        Assert.IsType<RankLayout>(overridden);
        Assert.Empty(LayoutEquality.Differences(Layout(assembly, "Next"), overridden));
        Assert.Empty(LayoutEquality.Differences(MegatronVectors.Load(nextFile), overridden));
    }

    private static IRankLayout Layout(Assembly assembly, string recipe) =>
        (IRankLayout)(assembly.GetType($"Moe.Recipes.{recipe}+Wiring") ?? throw new Xunit.Sdk.XunitException($"No {recipe}.Wiring: the fallback was emitted."))
            .GetProperty("Layout", BindingFlags.Public | BindingFlags.Static)!.GetValue(null)!;

    private static RecipeSettings Settings(Assembly assembly, string recipe) =>
        ((Recipe)Activator.CreateInstance(assembly.GetType($"Moe.Recipes.{recipe}")!)!).ToSettings();

    private static int Constant(Type wiring, string name) => (int)wiring.GetField(name, BindingFlags.Public | BindingFlags.Static)!.GetValue(null)!;
}
