using Moe.Runtime;
using System.Text.Json;
using Moe.Dsl;
using Moe.Runtime.Commands;
using Moe.Runtime.Commands.Train;
using Moe.Runtime.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Training;

[Collection("Console")]
public class TrainerTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-train-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>TinyMixtral shrunk further so a test run takes a second or two.</summary>
    private static RecipeSettings Tiny(int steps = 12) => TrainCommand.ResolvePaths(new Moe.Recipes.TinyMixtral().ToSettings() with
    {
        Model = Model.TinyMixtral with { Layers = 2 },
        Data = new Moe.Recipes.TinyMixtral().Data with { SequenceLength = 64 },
        Training = new Moe.Recipes.TinyMixtral().Training with { Steps = steps, WarmupSteps = 2, GlobalBatchSize = 4, MicroBatchSize = 2 },
    });

    private static TrainResult Train(RecipeSettings s, string? metrics = null)
    {
        using var source = new IndexedSampleSource(s, s.Model.EosTokenId);
        using var writer = new MetricsWriter(metrics);
        using var trainer = new Trainer(s, CPU, TextWriter.Null);
        return trainer.Run(source, writer);
    }

    [Theory]
    // warm-up 10 of 100, lr 1e-3 → min 1e-4: step 5 = 1e-3·5/10; step 10 = peak; step 55 halfway down the cosine; step 100 = min.
    [InlineData(5, 5e-4)]
    [InlineData(10, 1e-3)]
    [InlineData(55, 5.5e-4)]
    [InlineData(100, 1e-4)]
    public void CosineSchedule_MatchesMegatronsFormula(int step, double expected)
    {
        var t = new Dsl.Training { LearningRate = 1e-3, MinLearningRate = 1e-4, WarmupSteps = 10, Steps = 100, Schedule = LrSchedule.Cosine };
        Assert.Equal(expected, LearningRate.At(step, t), 12);
    }

    [Fact]
    public void LinearSchedule_DecaysLinearly()
    {
        var t = new Dsl.Training { LearningRate = 1e-3, MinLearningRate = 0, WarmupSteps = 0, Steps = 100, Schedule = LrSchedule.Linear };
        Assert.Equal(0.75e-3, LearningRate.At(25, t), 12);
    }

    [Fact]
    public void Training_LossFallsAndMetricsHaveTheSchema()
    {
        string metrics = Path.Combine(_dir, "m.jsonl");
        var r = Train(Tiny(steps: 20), metrics);
        Assert.True(r.Steps.TakeLast(3).Average(m => m.LmLoss) < r.Steps.Take(3).Average(m => m.LmLoss) - 0.5,
            $"loss did not fall: {string.Join(", ", r.Steps.Select(m => m.LmLoss.ToString("F3")))}");
        var lines = File.ReadAllLines(metrics);
        Assert.Equal(20, lines.Length);
        using var doc = JsonDocument.Parse(lines[^1]);
        var root = doc.RootElement;
        foreach (var key in new[] { "step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_expert", "drop_rate", "tokens_per_s" })
            Assert.True(root.TryGetProperty(key, out _), $"metrics line lacks {key}");
        Assert.Equal(20, root.GetProperty("step").GetInt32());
        // 2 layers × 4 experts; each step routes GBS·S·k = 4·64·2 token-expert pairs per layer, all kept (dropless).
        var perExpert = root.GetProperty("tokens_per_expert");
        Assert.Equal(2, perExpert.GetArrayLength());
        Assert.Equal(4 * 64 * 2, perExpert[0].EnumerateArray().Sum(e => e.GetInt64()));
        Assert.Equal(0.0, root.GetProperty("drop_rate").GetDouble());
    }

    [Fact]
    public void SameSeed_GivesTheSameLosses()
    {
        var a = Train(Tiny(steps: 4)).Steps.Select(m => m.Loss);
        var b = Train(Tiny(steps: 4)).Steps.Select(m => m.Loss);
        Assert.Equal(a, b);
    }

    [Fact]
    public void CapacityFactor_DropsTokensAndReportsTheRate()
    {
        var s = Tiny(steps: 2) with { Capacity = new Capacity { Factor = 0.5 } };
        var r = Train(s);
        Assert.True(r.Steps[^1].DropRate >= 0.5 - 1e-9, $"capacity 0.5 keeps at most half: drop rate {r.Steps[^1].DropRate}");
    }

    [Fact]
    public void AbsurdLearningRate_StopsWithTheLastGoodStep()
    {
        var s = Tiny(steps: 30) with { Training = Tiny().Training with { Steps = 30, LearningRate = 1e6, MinLearningRate = 1e5, WarmupSteps = 0, ClipGrad = 0 } };
        var e = Assert.Throws<UserError>(() => Train(s));
        Assert.Matches(@"The (loss|gradient norm) became (NaN|infinite) at step \d+[^;]*; (the last good step was \d+|no step completed)", e.Message);
        Assert.Contains("Lower the learning rate", e.Message);
    }

    [Fact]
    public void TrainVerb_TinyMixtral_TrainsFromTheShippedData()
    {
        string metrics = Path.Combine(_dir, "verb.jsonl");
        var (exit, output, _) = Moe.Tests.ConsoleCapture.Run(() =>
            MoeCommands.Run(MoeCommands.CreateRoot(new Moe.Recipes.TinyMixtral().ToSettings()), ["train", "--steps", "30", "--metrics", metrics, "--run-dir", Path.Combine(_dir, "run")]));
        Assert.True(exit == 0, output);
        var losses = File.ReadAllLines(metrics).Select(l => JsonDocument.Parse(l).RootElement.GetProperty("lm_loss").GetDouble()).ToArray();
        Assert.Equal(30, losses.Length);
        Assert.True(losses.TakeLast(5).Average() < losses.Take(5).Average() - 1.0, string.Join(", ", losses));
    }

    [Fact]
    public void TrainVerb_MissingData_IsAStartUpFinding()
    {
        var (exit, _, err) = Moe.Tests.ConsoleCapture.Run(() =>
            MoeCommands.Run(MoeCommands.CreateRoot(new Moe.Recipes.TinyMixtral().ToSettings()), ["train", "--data-path", Path.Combine(_dir, "nothing_text_document")]));
        Assert.Equal(2, exit);
        Assert.Contains("MOE0903", err);
        Assert.Contains("nothing_text_document.bin does not exist", err);
    }
}

public class BenchTests
{
    [Fact]
    public void ModelFlops_CountLikeTheTransformersBaselineScript()
    {
        // By hand for 8x7B, 2 layers, seq 4096: qkvo 83,886,080 + attention 33,554,432 + experts 704,643,072
        // + router 65,536 per layer; LM head 262,144,000; ×3 for forward + backward.
        var c = Moe.Runtime.Modeling.MixtralConfig.From(Model.Mixtral8x7B) with { Layers = 2 };
        Assert.Equal(5_719_326_720d, Moe.Runtime.Commands.Bench.BenchCommand.ModelFlopsPerToken(c, 4096));
    }

    [Fact]
    public void BenchOnCpu_PrintsOneJsonLineWithTheBaselinesFields()
    {
        var output = new StringWriter();
        Assert.Equal(0, Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 1, 32, 1, 2, "cpu"), output));
        using var doc = JsonDocument.Parse(output.ToString());
        foreach (var key in new[] { "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "step_s", "max_mem_gb" })
            Assert.True(doc.RootElement.TryGetProperty(key, out _), key);
        Assert.True(doc.RootElement.GetProperty("tokens_per_s_per_gpu").GetDouble() > 0);
    }

    [Fact]
    public void BenchOnCpu_TwoRanksWithExpertParallel_ReportsPerRankThroughput()
    {
        // Two in-process ranks, EP 2, two micro-batches: the same protocol and the gradient reduction on every rank.
        var output = new StringWriter();
        Assert.Equal(0, Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 1, 32, 1, 2, "cpu", Gpus: 2, Expert: 2, MicroBatches: 2), output));
        using var doc = JsonDocument.Parse(output.ToString());
        Assert.Equal(2, doc.RootElement.GetProperty("gpus").GetInt32());
        Assert.Equal(2, doc.RootElement.GetProperty("ep").GetInt32());
        Assert.Equal(2, doc.RootElement.GetProperty("micro_batches").GetInt32());
        double step = doc.RootElement.GetProperty("step_s").GetDouble(), perGpu = doc.RootElement.GetProperty("tokens_per_s_per_gpu").GetDouble();
        Assert.Equal(2 * 32 / step, perGpu, 6);   // tokens of one rank's micro-batches over the (slowest rank's) step
    }
}
