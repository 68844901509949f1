using System.Text.Json;
using Moe.Runtime.Commands;
using Xunit;

namespace Moe.Runtime.Tests.Training;

/// <summary>The train verb end to end: a diverging run exits 2 with a message, and --save writes a checkpoint --load continues from.</summary>
[Collection("Console")]
public class TrainVerbTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-trainverb-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private (int Exit, string Out, string Err) Train(params string[] args) => Moe.Tests.ConsoleCapture.Run(() =>
        MoeCommands.Run(MoeCommands.CreateRoot(new Moe.Recipes.TinyMixtral().ToSettings()),
            ["train", "--seq-length", "32", "--run-dir", Path.Combine(_dir, "runs", Guid.NewGuid().ToString("N")), .. args]));

    private static double[] LmLosses(string metrics) =>
        File.ReadAllLines(metrics).Select(l => JsonDocument.Parse(l).RootElement.GetProperty("lm_loss").GetDouble()).ToArray();

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

    [Fact]
    public void Save_WritesACheckpointThatLoadContinuesFrom()
    {
        string save = Path.Combine(_dir, "ckpt");
        string fresh = Path.Combine(_dir, "fresh.jsonl"), resumed = Path.Combine(_dir, "resumed.jsonl");
        var (exit, output, err) = Train("--steps", "12", "--save", save, "--metrics", fresh);
        Assert.True(exit == 0, output + err);
        Assert.Equal("12", File.ReadAllText(Path.Combine(save, "latest_checkpointed_iteration.txt")).Trim());
        string iter = Path.Combine(save, "iter_0000012");
        Assert.True(File.Exists(Path.Combine(iter, "config.json")), output);
        Assert.NotEmpty(Directory.GetFiles(iter, "*.safetensors"));

        (exit, output, err) = Train("--steps", "10", "--load", iter, "--metrics", resumed);
        Assert.True(exit == 0, output + err);
        // Step 1 sees the same samples in both runs: from the trained weights its loss is well below the random start's.
        Assert.True(LmLosses(resumed)[0] < LmLosses(fresh)[0] - 0.1, $"resumed {LmLosses(resumed)[0]} vs fresh {LmLosses(fresh)[0]}");
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
