using System.Text.Json;
using Moe.Runtime.Commands;
using Xunit;

namespace Moe.Runtime.Tests.Training;

/// <summary>The train verb end to end: a diverging run exits 2 with a message; --save, --save-interval and --load resume a run exactly.</summary>
[Collection("Console")]
public class TrainVerbTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-trainverb-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private (int Exit, string Out, string Err) Train(params string[] args) => Moe.Tests.ConsoleCapture.Run(() =>
        MoeCommands.Run(MoeCommands.CreateRoot(new Moe.Recipes.TinyMixtral().ToSettings()),
            ["train", "--seq-length", "32", "--run-dir", Path.Combine(_dir, "runs", Guid.NewGuid().ToString("N")), .. args]));

    [Fact]
    public void DivergingRun_ExitsTwoNamingTheStepWithoutAStackTrace()
    {
        string metrics = Path.Combine(_dir, "nan.jsonl");
        var (exit, output, err) = Train("--steps", "20", "--lr", "1e6", "--metrics", metrics);
        Assert.Equal(2, exit);
        Assert.Matches(@"The (loss|gradient norm) became (NaN|infinite) at step \d+", err);
        Assert.DoesNotContain("   at ", err + output);
        // Every step before the bad one was written, and none after it.
        var written = File.ReadAllLines(metrics).Select(l => JsonDocument.Parse(l).RootElement.GetProperty("step").GetInt32()).ToArray();
        int bad = int.Parse(System.Text.RegularExpressions.Regex.Match(err, @"at step (\d+)").Groups[1].Value);
        Assert.Equal(Enumerable.Range(1, bad - 1), written);
    }

    private static (int Step, double LmLoss)[] Steps(string metrics) =>
        File.ReadAllLines(metrics).Select(l => JsonDocument.Parse(l).RootElement).Select(r => (r.GetProperty("step").GetInt32(), r.GetProperty("lm_loss").GetDouble())).ToArray();

    [Fact]
    public void SaveInterval_WritesStepsFiveAndTen_AndLoadContinuesFromEither()
    {
        string save = Path.Combine(_dir, "ckpt");
        string full = Path.Combine(_dir, "full.jsonl"), resumed = Path.Combine(_dir, "resumed.jsonl");
        string[] small = ["--global-batch-size", "4", "--micro-batch-size", "4"];
        var (exit, output, err) = Train([.. small, "--steps", "10", "--save", save, "--save-interval", "5", "--metrics", full]);
        Assert.True(exit == 0, output + err);
        Assert.Equal("10", File.ReadAllText(Path.Combine(save, "latest_checkpointed_iteration.txt")));
        Assert.True(File.Exists(Path.Combine(save, "iter_0000005", "metadata.json")), output);
        Assert.True(File.Exists(Path.Combine(save, "iter_0000010", "metadata.json")), output);
        Assert.Contains($"saved {Path.Combine(save, "iter_0000005")}", output);

        // The step-5 folder: steps 6–10, their metrics numbered 6..10 and equal to the uninterrupted run's.
        (exit, output, err) = Train([.. small, "--steps", "10", "--load", Path.Combine(save, "iter_0000005"), "--metrics", resumed]);
        Assert.True(exit == 0, output + err);
        Assert.Contains("continuing at step 6 of 10", output);
        Assert.Contains("training TinyMixtral: steps 6–10 of 10", output);
        Assert.Equal(Steps(full)[5..], Steps(resumed));

        // The save folder: its latest, step 10 — nothing left to train.
        (exit, output, err) = Train([.. small, "--steps", "10", "--load", save]);
        Assert.True(exit == 0, output + err);
        Assert.Contains($"resumed from {Path.Combine(save, "iter_0000010")}: iteration 10 done", output);
        Assert.Contains("done: no step left to train.", output);

        // Exported to a Hugging Face folder (CheckpointFormatTests checks the folder itself).
        string hf = Path.Combine(_dir, "hf");
        var export = Moe.Tests.ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(), ["checkpoint", "export", save, "--hf", hf]));
        Assert.True(export.Exit == 0, export.Out + export.Err);
        Assert.Contains($"exported {Path.Combine(save, "iter_0000010")} (iteration 10) to {hf}", export.Out);
    }

    [Fact]
    public void Simulate_SavesEveryRanksShards_AndResumesExactly()
    {
        string save = Path.Combine(_dir, "sim");
        string full = Path.Combine(_dir, "sim-full.jsonl"), resumed = Path.Combine(_dir, "sim-resumed.jsonl");
        string[] layout = ["--simulate", "--gpus", "2", "--ep", "2", "--global-batch-size", "4", "--micro-batch-size", "2", "--steps", "10"];
        var (exit, output, err) = Train([.. layout, "--save", save, "--save-interval", "5", "--metrics", full]);
        Assert.True(exit == 0, output + err);
        Assert.Equal(["rank_00000.safetensors", "rank_00001.safetensors"],
            Directory.GetFiles(Path.Combine(save, "iter_0000005"), "rank_*").Select(Path.GetFileName).Order(StringComparer.Ordinal));
        (exit, output, err) = Train([.. layout, "--load", Path.Combine(save, "iter_0000005"), "--metrics", resumed]);
        Assert.True(exit == 0, output + err);
        Assert.Equal(Steps(full)[5..], Steps(resumed));
    }

    [Fact]
    public void MetricsLine_NonFiniteNumber_IsNullNotAnException()
    {
        var m = new Moe.Runtime.Training.StepMetrics(3, 1.5, 1.25, double.PositiveInfinity, 0, 1e-3, double.NaN, [[1L, 2L]], 0, 10);
        var root = JsonDocument.Parse(m.ToJson()).RootElement;
        Assert.Equal(JsonValueKind.Null, root.GetProperty("aux_loss").ValueKind);
        Assert.Equal(JsonValueKind.Null, root.GetProperty("grad_norm").ValueKind);
        Assert.Equal(1.25, root.GetProperty("lm_loss").GetDouble());
        Assert.Equal(2, root.GetProperty("format").GetInt32());
        Assert.Equal(JsonValueKind.Null, root.GetProperty("val_loss").ValueKind);   // not evaluated at this step
    }
}
