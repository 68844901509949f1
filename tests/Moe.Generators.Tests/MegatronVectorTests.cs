using System.Reflection;
using System.Text.Json;
using Microsoft.CodeAnalysis;
using Moe.Dsl.Layout;
using Moe.Tests;

namespace Moe.Generators.Tests;

/// <summary>
/// The generated groups, coordinates and communicator creation order equal Megatron-Core 0.20's own
/// output (shared/vectors/megatron-ranks, recorded from initialize_model_parallel). The generated code is
/// compiled and loaded, so this checks what the recipe project actually gets.
/// </summary>
public sealed class MegatronVectorTests
{
    public static TheoryData<string> Vectors()
    {
        var data = new TheoryData<string>();
        foreach (var path in Directory.GetFiles(VectorDirectory, "*.json").OrderBy(p => p, StringComparer.Ordinal))
            data.Add(Path.GetFileName(path));
        return data;
    }

    private static string VectorDirectory => Path.Combine(TestPaths.Shared, "vectors", "megatron-ranks");

    /// <summary>Mixtral8x22b's exact layout (32 GPUs, TP 2, PP 2, EP 8, ETP = TP) has a vector: the real recipe file against it.</summary>
    [Fact]
    public void Mixtral8x22bRecipe_EqualsMegatronVector()
    {
        var wiring = GenerateAndLoad(GeneratorHarness.RecipeSource("Mixtral8x22b"), "Mixtral8x22b");
        AssertEqualsVector(wiring, "w32-tp2-pp2-cp1-ep8-etp2-tp-cp-ep-dp-pp.json");
    }

    /// <summary>
    /// Every vector layout as a small recipe (Mixtral 8x7B's model fits them all). There is no vector for
    /// Mixtral8x7b's exact layout (w32-tp1-pp1-cp1-ep8-etp1); w32-tp1-pp4-cp1-ep8-etp1 covers EP 8 over 32
    /// GPUs with TP 1 (only PP differs), and the others cover every shape the recipes use.
    /// </summary>
    [Theory]
    [MemberData(nameof(Vectors))]
    public void VectorLayoutRecipe_EqualsMegatronVector(string vectorFile)
    {
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(VectorDirectory, vectorFile)));
        var v = json.RootElement;
        int tp = v.GetProperty("tp").GetInt32();
        string order = v.GetProperty("order").GetString()!;
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
                    Gpus = {{v.GetProperty("world").GetInt32()}},
                    Tensor = {{tp}},
                    Pipeline = {{v.GetProperty("pp").GetInt32()}},
                    Context = {{v.GetProperty("cp").GetInt32()}},
                    Expert = {{v.GetProperty("ep").GetInt32()}},
                    ExpertTensor = {{v.GetProperty("etp").GetInt32()}},
                    SequenceParallel = {{(tp > 1 ? "true" : "false")}},
                    Order = RankOrder.{{(order == "tp-cp-ep-dp-pp" ? "TpCpEpDpPp" : "TpCpEpPpDp")}},
                };

                public override Data Data => new() { Prefix = "data/text_document" };

                public override Training Training => new() { GlobalBatchSize = 1024, MicroBatchSize = 1 };
            }
            """;
        AssertEqualsVector(GenerateAndLoad(source, "VectorRecipe"), vectorFile);
    }

    private static Type GenerateAndLoad(string source, string recipe)
    {
        var (_, output, result) = GeneratorHarness.Run(GeneratorHarness.Compilation(OutputKind.DynamicallyLinkedLibrary, source));
        string wiring = GeneratorHarness.Sources(result)[$"Moe.Recipes.{recipe}.Wiring.g.cs"];
        Assert.True(wiring.Contains("public static class Groups", StringComparison.Ordinal), "The fallback was emitted:\n" + wiring);
        return GeneratorHarness.EmitAndLoad(output).GetType($"Moe.Recipes.{recipe}Wiring", throwOnError: true)!;
    }

    private static void AssertEqualsVector(Type wiring, string vectorFile)
    {
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(VectorDirectory, vectorFile)));
        var v = json.RootElement;

        Assert.Equal(v.GetProperty("world").GetInt32(), Constant(wiring, "Gpus"));
        Assert.Equal(v.GetProperty("dp").GetInt32(), Constant(wiring, "DataParallel"));
        Assert.Equal(v.GetProperty("edp").GetInt32(), Constant(wiring, "ExpertDataParallel"));
        Assert.Equal(v.GetProperty("order").GetString(), (string)wiring.GetField("Order")!.GetValue(null)!);

        var byKey = (IReadOnlyDictionary<string, IReadOnlyList<IReadOnlyList<int>>>)wiring.GetNestedType("Groups")!
            .GetProperty("ByKey")!.GetValue(null)!;
        var expectedFamilies = v.GetProperty("groups").EnumerateObject().ToArray();
        Assert.Equal(expectedFamilies.Select(f => f.Name).Order(StringComparer.Ordinal), byKey.Keys.Order(StringComparer.Ordinal));
        foreach (var family in expectedFamilies)
        {
            var expected = family.Value.EnumerateArray().Select(g => g.EnumerateArray().Select(r => r.GetInt32()).ToArray()).ToArray();
            var actual = byKey[family.Name].Select(g => g.ToArray()).ToArray();
            Assert.True(expected.Length == actual.Length && expected.Zip(actual).All(p => p.First.SequenceEqual(p.Second)),
                $"{family.Name}: expected {Show(expected)}, generated {Show(actual)}");
        }

        var coordinates = (IReadOnlyList<RankCoordinates>)wiring.GetProperty("Coordinates")!.GetValue(null)!;
        var expectedCoordinates = v.GetProperty("coords").EnumerateArray().Select(c => new RankCoordinates(
            c.GetProperty("tp").GetInt32(), c.GetProperty("cp").GetInt32(), c.GetProperty("dp").GetInt32(), c.GetProperty("pp").GetInt32(),
            c.GetProperty("dp_cp").GetInt32(), c.GetProperty("ep").GetInt32(), c.GetProperty("etp").GetInt32(), c.GetProperty("edp").GetInt32())).ToArray();
        Assert.Equal(expectedCoordinates, coordinates);

        var creation = (IReadOnlyList<GroupCreation>)wiring.GetProperty("CreationOrder")!.GetValue(null)!;
        var expectedCreation = v.GetProperty("creation_order").EnumerateArray().Select(c => new GroupCreation(
            c[0].GetString()!, c[1].GetString()!, c[2].GetString()!, c[3].GetInt32(), c[4].GetInt32())).ToArray();
        Assert.Equal(expectedCreation, creation);
    }

    private static int Constant(Type wiring, string name) => (int)wiring.GetField(name, BindingFlags.Public | BindingFlags.Static)!.GetValue(null)!;

    private static string Show(int[][] groups) => string.Join(" ", groups.Select(g => "[" + string.Join(",", g) + "]"));
}
