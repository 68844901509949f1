using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;

namespace Moe.Generators.Tests;

/// <summary>The pipeline's tracked steps stay cached when nothing the recipe depends on changes.</summary>
public sealed class IncrementalTests
{
    private const string Unrelated = "namespace Other; public static class Unrelated { public const int Value = 1; }";
    private const string UnrelatedEdited = "namespace Other; public static class Unrelated { public const int Value = 2; public static int Twice => Value * 2; }";

    [Fact]
    public void UnrelatedEdit_LeavesTrackedStepsCachedOrUnchanged()
    {
        var input = GeneratorHarness.Compilation(OutputKind.ConsoleApplication, GeneratorHarness.RecipeSource("Mixtral8x7b"), Unrelated);
        var (driver, _, _) = GeneratorHarness.Run(input);

        var edited = input.ReplaceSyntaxTree(input.SyntaxTrees[1], CSharpSyntaxTree.ParseText(UnrelatedEdited, GeneratorHarness.ParseOptions, path: "Source1.cs"));
        var (_, _, result) = GeneratorHarness.Run(edited, driver);

        var run = result.Results.Single();
        foreach (string step in new[] { RecipeGenerator.TrackingNames.RecipeSpec, RecipeGenerator.TrackingNames.EmitMain, RecipeGenerator.TrackingNames.RecipeWithEntryPoint })
        {
            var outputs = run.TrackedSteps[step].SelectMany(s => s.Outputs).ToArray();
            Assert.NotEmpty(outputs);
            Assert.All(outputs, o => Assert.True(o.Reason is IncrementalStepRunReason.Cached or IncrementalStepRunReason.Unchanged, $"{step}: {o.Reason}"));
        }
        Assert.All(run.TrackedOutputSteps.SelectMany(s => s.Value).SelectMany(s => s.Outputs),
            o => Assert.Equal(IncrementalStepRunReason.Cached, o.Reason));
    }

    [Fact]
    public void RecipeEdit_ModifiesTheSpec()
    {
        string source = GeneratorHarness.RecipeSource("Mixtral8x7b");
        var input = GeneratorHarness.Compilation(OutputKind.ConsoleApplication, source, Unrelated);
        var (driver, _, _) = GeneratorHarness.Run(input);

        string moreGpus = source.Replace("Gpus = 32,", "Gpus = 64,");
        Assert.NotEqual(source, moreGpus);
        var edited = input.ReplaceSyntaxTree(input.SyntaxTrees[0], CSharpSyntaxTree.ParseText(moreGpus, GeneratorHarness.ParseOptions, path: "Source0.cs"));
        var (_, _, result) = GeneratorHarness.Run(edited, driver);

        var specStep = result.Results.Single().TrackedSteps[RecipeGenerator.TrackingNames.RecipeSpec].Single().Outputs.Single();
        Assert.Equal(IncrementalStepRunReason.Modified, specStep.Reason);
        Assert.Contains("public const int Gpus = 64;", GeneratorHarness.Sources(result)["Moe.Recipes.Mixtral8x7b.Wiring.g.cs"]);
    }
}
