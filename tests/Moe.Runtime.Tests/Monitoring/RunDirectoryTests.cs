using System.Text.Json;
using Moe.Runtime.Commands;
using Xunit;

namespace Moe.Runtime.Tests.Monitoring;

/// <summary>
/// The train verb's run directory end to end on TinyMixtral: `train --steps 3` (shorter than the recipe's 10 warm-up
/// steps), the TensorBoard file read back by a reader written from the formats' specifications, and the bad inputs
/// that must fail before training starts.
/// </summary>
[Collection("Console")]
public class RunDirectoryTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-rundir-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static (int Exit, string Out, string Err) Train(params string[] args) => Moe.Tests.ConsoleCapture.Run(() =>
        MoeCommands.Run(MoeCommands.CreateRoot(new Moe.Recipes.TinyMixtral().ToSettings()), ["train", "--seq-length", "32", .. args]));

    [Fact]
    public void ThreeSteps_WriteTheRunDirectoryAndTensorBoardEventsEveryCrcOfWhichChecks()
    {
        string run = Path.Combine(_dir, "run"), tb = Path.Combine(_dir, "tb");
        var (exit, output, err) = Train("--steps", "3", "--run-dir", run, "--tensorboard", tb);
        Assert.True(exit == 0, output + err);
        Assert.Contains("warning MOE0213 [Training.WarmupSteps]: WarmupSteps (10) exceeds Steps (3)", err);

        // The run directory: the resolved recipe (warm-up capped), the environment, the log, format-2 metrics.
        using var recipe = JsonDocument.Parse(File.ReadAllText(Path.Combine(run, "recipe.json")));
        Assert.Equal(3, recipe.RootElement.GetProperty("Training").GetProperty("WarmupSteps").GetInt32());
        using var env = JsonDocument.Parse(File.ReadAllText(Path.Combine(run, "environment.json")));
        foreach (var key in new[] { "dotnet", "torchsharp", "libtorch", "device", "git_commit", "host", "command_line" })
            Assert.True(env.RootElement.TryGetProperty(key, out _), key);
        Assert.Contains("step 3/3", File.ReadAllText(Path.Combine(run, "train.log")));
        var lines = File.ReadAllLines(Path.Combine(run, "metrics.jsonl")).Select(l => JsonDocument.Parse(l).RootElement).ToArray();
        Assert.Equal([1, 2, 3], lines.Select(l => l.GetProperty("step").GetInt32()));
        Assert.All(lines, l => Assert.Equal(2, l.GetProperty("format").GetInt32()));
        Assert.Equal(JsonValueKind.Number, lines[2].GetProperty("val_loss").ValueKind);   // evaluated after the last step

        // TensorBoard: one file named events.out.tfevents.<10-digit unix seconds>.<host>, every record's CRCs valid.
        var file = Assert.Single(Directory.GetFiles(tb));
        Assert.Matches(@"^events\.out\.tfevents\.\d{10}\.[^.]+", Path.GetFileName(file));
        var events = TensorBoardEventReader.Read(File.ReadAllBytes(file));
        Assert.Equal("brain.Event:2", events[0].FileVersion);
        Assert.Equal([1L, 2L, 3L], events.Skip(1).Select(e => e.Step!.Value));
        var s3 = events[3].Scalars;
        foreach (var tag in new[] { "loss", "lm loss", "load_balancing_loss", "z_loss", "learning-rate", "grad-norm", "throughput/tokens_per_s",
                     "moe/drop_rate", "moe/drop_rate/layer_03", "moe/tokens/layer_00/expert_00", "moe/tokens/layer_03/expert_03", "lm loss validation" })
            Assert.True(s3.ContainsKey(tag), $"step 3 lacks {tag}: {string.Join(", ", s3.Keys)}");
        Assert.False(events[1].Scalars.ContainsKey("lm loss validation"));   // EvalInterval 20: only the last step evaluates
        Assert.False(s3.ContainsKey("throughput/mfu"));                       // no peak FLOPs known on the CPU
        // Warm-up capped at 3 steps: lr = 3e-3 · s / 3 (hand arithmetic), as float32.
        Assert.Equal(1e-3f, events[1].Scalars["learning-rate"], 7);
        Assert.Equal(3e-3f, events[3].Scalars["learning-rate"], 7);
        // Routed tokens per layer: 8 samples × 32 tokens × top-2 = 512.
        Assert.Equal(512f, Enumerable.Range(0, 4).Sum(e => events[3].Scalars[$"moe/tokens/layer_01/expert_{e:D2}"]));
        Assert.Equal((float)lines[2].GetProperty("lm_loss").GetDouble(), s3["lm loss"]);
        Assert.InRange(events[3].WallTime, (double)DateTimeOffset.UtcNow.AddHours(-1).ToUnixTimeSeconds(), DateTimeOffset.UtcNow.ToUnixTimeSeconds() + 1.0);
    }

    [Fact]
    public void SignalInStopOn_StopsAfterWritingTheStepAndACheckpoint_ExitCodeThree()
    {
        var recipe = new Moe.Recipes.TinyMixtral().ToSettings() with
        {
            Capacity = new Moe.Dsl.Capacity { Factor = 0.5 },
            Health = new Moe.Dsl.Health { StopOn = Moe.Dsl.HealthSignal.DropRate },
        };
        string run = Path.Combine(_dir, "run"), save = Path.Combine(_dir, "ckpt");
        var (exit, output, err) = Moe.Tests.ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(recipe),
            ["train", "--seq-length", "32", "--steps", "5", "--run-dir", run, "--save", save]));
        Assert.True(exit == 3, output + err);
        Assert.Contains("stopped: Stopped after step 1 because DropRate is in Health.StopOn: token drop rate", output);
        Assert.Single(File.ReadAllLines(Path.Combine(run, "metrics.jsonl")));
        Assert.Equal("1", File.ReadAllText(Path.Combine(save, "latest_checkpointed_iteration.txt")).Trim());
    }

    [Fact]
    public void EventReader_ChecksTheCrcsItReads()
    {
        // The reader's CRC-32C against the standard check value (RFC 3720 B.4: "123456789" → 0xE3069283).
        Assert.Equal(0xE3069283u, TensorBoardEventReader.Crc32C("123456789"u8));
        using var writer = new Moe.Runtime.Monitoring.TensorBoardWriter(Path.Combine(_dir, "tb"));
        writer.Dispose();
        var bytes = File.ReadAllBytes(writer.Path);
        Assert.Single(TensorBoardEventReader.Read(bytes));
        bytes[^6] ^= 0x01;   // one bit of the record's data
        Assert.Throws<InvalidDataException>(() => TensorBoardEventReader.Read(bytes));
    }

    [Fact]
    public void MetricsFileOfAnotherRun_IsRefusedUnlessAppendIsAsked()
    {
        string metrics = Path.Combine(_dir, "m.jsonl");
        File.WriteAllText(metrics, """{"format":2,"run":"earlier-run","step":1}""" + "\n");
        var (exit, _, err) = Train("--steps", "1", "--run-dir", Path.Combine(_dir, "a"), "--metrics", metrics);
        Assert.Equal(2, exit);
        Assert.Contains("already holds the metrics of another run (run earlier-run)", err);
        Assert.Contains("--append-metrics", err);
        Assert.Single(File.ReadAllLines(metrics));

        (exit, var output, err) = Train("--steps", "1", "--run-dir", Path.Combine(_dir, "b"), "--metrics", metrics, "--append-metrics");
        Assert.True(exit == 0, output + err);
        var lines = File.ReadAllLines(metrics);
        Assert.Equal(2, lines.Length);
        Assert.NotEqual("earlier-run", JsonDocument.Parse(lines[1]).RootElement.GetProperty("run").GetString());
    }

    [Fact]
    public void UnwritableRunOrTensorBoardDirectory_FailsBeforeTraining()
    {
        string file = Path.Combine(_dir, "a-file");
        File.WriteAllText(file, "");
        var (exit, output, err) = Train("--steps", "1", "--run-dir", Path.Combine(file, "run"));
        Assert.Equal(2, exit);
        Assert.Contains("cannot be written", err);
        Assert.Contains("--run-dir", err);
        Assert.DoesNotContain("step 1/1", output);

        string run = Path.Combine(_dir, "run");
        (exit, output, err) = Train("--steps", "1", "--run-dir", run, "--tensorboard", Path.Combine(file, "tb"));
        Assert.Equal(2, exit);
        Assert.Contains("The TensorBoard directory", err);
        Assert.DoesNotContain("step 1/1", output);
        Assert.Equal(0, new FileInfo(Path.Combine(run, "metrics.jsonl")).Length);
    }
}
