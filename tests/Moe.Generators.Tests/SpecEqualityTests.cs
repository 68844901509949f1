using Microsoft.CodeAnalysis;

namespace Moe.Generators.Tests;

/// <summary>Specs compare by value, so the pipeline can tell an unchanged recipe from a changed one.</summary>
public sealed class SpecEqualityTests
{
    [Fact]
    public void SameRecipeParsedTwice_GivesEqualSpecs()
    {
        var first = ParseSpec(GeneratorHarness.RecipeSource("Mixtral8x22b"));
        var second = ParseSpec(GeneratorHarness.RecipeSource("Mixtral8x22b"));

        Assert.NotSame(first, second);
        Assert.Equal(first, second);
        Assert.Equal(first.GetHashCode(), second.GetHashCode());
    }

    [Fact]
    public void DifferentRecipes_GiveDifferentSpecs()
    {
        Assert.NotEqual(ParseSpec(GeneratorHarness.RecipeSource("Mixtral8x7b")), ParseSpec(GeneratorHarness.RecipeSource("Mixtral8x22b")));
    }

    [Fact]
    public void NestedArraysWithEqualElements_AreEqual()
    {
        GroupFamilySpec Family(params int[][] groups) =>
            new("tp", "Tensor", "TENSOR_MODEL_PARALLEL_GROUP", groups.Select(g => g.ToEquatableArray()).ToEquatableArray());

        Assert.Equal(Family([0, 1], [2, 3]), Family([0, 1], [2, 3]));
        Assert.Equal(Family([0, 1], [2, 3]).GetHashCode(), Family([0, 1], [2, 3]).GetHashCode());
        Assert.NotEqual(Family([0, 1], [2, 3]), Family([0, 1], [3, 2]));
        Assert.NotEqual(Family([0, 1], [2, 3]), Family([0, 1]));
    }

    [Fact]
    public void RecipeSpecsBuiltFromEqualValues_AreEqual()
    {
        RecipeSpec Spec(string finding) => new("Moe.Recipes", "R", "global::Moe.Recipes.R", true, "Tiny Mixtral", null,
            new[] { finding }.ToEquatableArray(), EquatableArray<string>.Empty);

        Assert.Equal(Spec("MOE0003 [Parallelism.Expert]: x"), Spec("MOE0003 [Parallelism.Expert]: x"));
        Assert.NotEqual(Spec("MOE0003 [Parallelism.Expert]: x"), Spec("MOE0003 [Parallelism.Expert]: y"));
    }

    private static RecipeSpec ParseSpec(string source)
    {
        var (_, _, result) = GeneratorHarness.Run(GeneratorHarness.Compilation(OutputKind.DynamicallyLinkedLibrary, source));
        var output = result.Results.Single().TrackedSteps[RecipeGenerator.TrackingNames.RecipeSpec].Single().Outputs.Single();
        return Assert.IsType<RecipeSpec>(output.Value);
    }
}
