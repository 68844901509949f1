using System.Text;
using DiffPlex.DiffBuilder;
using DiffPlex.DiffBuilder.Model;
using Microsoft.CodeAnalysis;

namespace Moe.Generators.Tests;

/// <summary>
/// The generated wiring and Main of the shipped recipes against checked-in baselines (Baselines/*.cs),
/// compared line by line. The baselines are our generator's output, reviewed by hand against each recipe:
/// TinyMixtral: 1 GPU, every family one group [0], 4 layers on stage 0, experts 0–3 on expert rank 0.
/// Mixtral8x7b: 32 GPUs, EP 8 ⇒ DP 32, EDP 4; ep groups [0..7] [8..15] [16..23] [24..31], expert_dp [r, r+8, r+16, r+24];
/// 32 layers on one stage; expert rank r owns expert r.
/// Mixtral8x22b: 32 GPUs, TP 2, PP 2, EP 8, ETP = TP = 2 ⇒ DP 8, EDP 1; tp pairs [2i, 2i+1], pp [r, r+16],
/// stage 0 layers 0–27, stage 1 layers 28–55 (56 layers); expert rank r owns expert r.
/// Set MOE_UPDATE_BASELINES=1 to rewrite them after a deliberate change, then review the diff.
/// </summary>
public sealed class BaselineTests
{
    [Theory]
    [InlineData("TinyMixtral")]
    [InlineData("Mixtral8x7b")]
    [InlineData("Mixtral8x22b")]
    public void ShippedRecipe_MatchesBaselines(string recipe)
    {
        var input = GeneratorHarness.Compilation(OutputKind.ConsoleApplication, GeneratorHarness.RecipeSource(recipe));
        var (_, output, result) = GeneratorHarness.Run(input);
        var sources = GeneratorHarness.Sources(result);

        Assert.Equal(
            new[] { $"Moe.Recipes.{recipe}.Main.g.cs", $"Moe.Recipes.{recipe}.Wiring.g.cs" },
            sources.Keys.OrderBy(k => k, StringComparer.Ordinal));
        foreach (var (hintName, actual) in sources)
            AssertMatchesBaseline(hintName, actual);

        // The generated code compiles warning-free against Moe.Dsl and Moe.Runtime.
        GeneratorHarness.EmitAndLoad(output);
    }

    private static void AssertMatchesBaseline(string hintName, string actual)
    {
        string path = Path.Combine(Moe.Tests.TestPaths.RepoRoot, "tests", "Moe.Generators.Tests", "Baselines", hintName);
        if (Environment.GetEnvironmentVariable("MOE_UPDATE_BASELINES") == "1")
            File.WriteAllText(path, actual);
        Assert.True(File.Exists(path), $"No baseline {path}; run with MOE_UPDATE_BASELINES=1 and review it.");
        string expected = File.ReadAllText(path);
        string[] expectedLines = Lines(expected), actualLines = Lines(actual);
        if (expectedLines.SequenceEqual(actualLines, StringComparer.Ordinal)) return;

        var diff = InlineDiffBuilder.Diff(string.Join("\n", expectedLines), string.Join("\n", actualLines));
        var report = new StringBuilder($"{hintName} differs from its baseline (- baseline, + generated):\n");
        int baselineLine = 0, generatedLine = 0;
        foreach (var piece in diff.Lines)
        {
            if (piece.Type != ChangeType.Inserted) baselineLine++;
            if (piece.Type != ChangeType.Deleted) generatedLine++;
            if (piece.Type == ChangeType.Deleted)
                report.Append($"- baseline line {baselineLine,5}: ").AppendLine(piece.Text);
            else if (piece.Type == ChangeType.Inserted)
                report.Append($"+ generated line {generatedLine,4}: ").AppendLine(piece.Text);
        }
        Assert.Fail(report.ToString());
    }

    private static string[] Lines(string text) => text.Replace("\r\n", "\n").TrimEnd('\n').Split('\n');
}
