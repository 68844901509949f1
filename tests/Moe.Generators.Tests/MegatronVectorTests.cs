using System.Reflection;
using System.Text.Json;
using Moe.Dsl.Layout;
using Moe.Tests;
using Xunit;

namespace Moe.Generators.Tests;

/// <summary>
/// Every layout in Megatron-Core 0.20's own vectors (shared/vectors/megatron-ranks, recorded from
/// initialize_model_parallel) written as a small recipe: the generated groups, coordinates and
/// communicator creation order, compiled and loaded, equal the vector. Both production recipes' layouts have a
/// vector (w32-tp1-pp4-cp1-ep8-etp1 and w32-tp2-pp2-cp1-ep8-etp2), and the set covers both orders, CP,
/// ETP ≠ TP, EP folding over CP, and 128 GPUs.
/// </summary>
public sealed class MegatronVectorTests
{
    private static string VectorDirectory => Path.Combine(TestPaths.Shared, "vectors", "megatron-ranks");

    public static TheoryData<string> Vectors()
    {
        var data = new TheoryData<string>();
        foreach (var path in Directory.GetFiles(VectorDirectory, "*.json").OrderBy(p => p, StringComparer.Ordinal))
            data.Add(Path.GetFileName(path));
        return data;
    }

    [Theory]
    [MemberData(nameof(Vectors))]
    public void VectorLayoutAsRecipe_GeneratesMegatronsGroups(string vectorFile)
    {
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(VectorDirectory, vectorFile)));
        var v = json.RootElement;
        int Size(string name) => v.GetProperty(name).GetInt32();
        // Mixtral 8x7B's model fits every vector layout (32 layers, 32 heads, 8 KV heads, 8 experts); SP where
        // TP > 1 and a global batch every DP divides keep the recipe valid, so the wiring (not the fallback) is emitted.
        string source = $$"""
            using Moe.Dsl;
            using Moe.Dsl.Layout;

            namespace Moe.Recipes;

            [Recipe]
            public sealed partial class VectorRecipe : Recipe
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
        var wiring = GeneratorHarness.RunAndLoad(source).GetType("Moe.Recipes.VectorRecipe+Wiring")
            ?? throw new Xunit.Sdk.XunitException("No VectorRecipe.Wiring: the fallback was emitted.\n" + string.Join("\n", GeneratorHarness.Run(source).Values));

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
    }

    private static int Constant(Type wiring, string name) => (int)wiring.GetField(name, BindingFlags.Public | BindingFlags.Static)!.GetValue(null)!;
}
