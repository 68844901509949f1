using Moe.Dsl;
using Moe.Runtime.Commands.Train;
using Moe.Runtime.Data;
using Moe.Runtime.Monitoring;
using Moe.Runtime.Training;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Monitoring;

/// <summary>
/// The tutorial's health signals (Step 5): each check on hand-made metrics whose numbers are worked out in the
/// comments, then on TinyMixtral runs — capacity small enough to drop tokens, and a router forced to collapse.
/// </summary>
public class HealthMonitorTests
{
    // Mixtral-like routing for the unit cases: top-2 of 4 experts.
    private static readonly RecipeSettings Settings = new Moe.Recipes.TinyMixtral().ToSettings() with
    {
        Health = new Health { Window = 2 },
        Capacity = new Capacity { Factor = 1.5, PadToCapacity = true },
        Training = new Moe.Recipes.TinyMixtral().Training with { MicroBatchSize = 4, GlobalBatchSize = 8 },
    };

    /// <summary>One layer; kept = routed × (1 − drop), so the per-layer drop rate equals <paramref name="drop"/>.</summary>
    private static StepMetrics Step(int step, double lm = 2.0, double drop = 0, long[]? routed = null)
    {
        routed ??= [250, 250, 250, 250];
        long[] kept = routed.Select(r => (long)Math.Round(r * (1 - drop))).ToArray();
        return new(step, lm, lm, 0, 0, 1e-3, 1, [kept], drop, 1000) { RoutedPerExpert = [routed], StepSeconds = 1 };
    }

    [Fact]
    public void DropRateAboveTheBound_WarnsOnceNamingCapacityFactorAndAgainAfterRecovering()
    {
        var output = new StringWriter();
        var monitor = new HealthMonitor(Settings, output);
        // Window 2: step 1 alone 0.2 > 0.01; steps 1–2 mean 0.2; steps 2–3 mean (0.2 + 0)/2 = 0.1; steps 3–4 mean 0; steps 4–5 mean 0.15.
        var warned = new[] { 0.2, 0.2, 0, 0, 0.3 }.Select((d, i) => monitor.StepEnded(Step(i + 1, drop: d)).Warnings).ToArray();
        Assert.Equal([1, 0, 0, 0, 1], warned.Select(w => w.Count));
        var w = warned[0][0];
        Assert.Equal(HealthSignal.DropRate, w.Signal);
        Assert.Equal("token drop rate 20.0 % (step 1, worst layer 0: 20.0 %) is above Health.MaxDropRate 1.0 %: raise Capacity.Factor gradually (now 1.5; e.g. 1.875)", w.Message);
        Assert.Contains("step 5: token drop rate 15.0 % (mean of steps 4–5", output.ToString());
        Assert.Equal(2, output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries).Length);
    }

    [Fact]
    public void UnevenExperts_WarnOfImbalanceNamingTheAuxLossCoefficient()
    {
        // Layer 0 routes [450, 350, 100, 100]: mean 250, max/mean 450/250 = 1.8 > 1.5; the top-2 share (450+350)/1000 = 0.8 ≤ 0.9.
        var m = new HealthMonitor(Settings, TextWriter.Null).StepEnded(Step(1, routed: [450, 350, 100, 100]));
        var w = Assert.Single(m.Warnings);
        Assert.Equal(HealthSignal.LoadImbalance, w.Signal);
        Assert.Equal("expert load imbalance 1.80 (max/mean routed tokens, step 1) in layer 0: expert 0 takes 45 % of the layer's assignments; above Health.MaxLoadImbalance 1.5: raise Router.AuxLossCoeff (now 0.02; e.g. 0.04) or Router.ZLossCoeff", w.Message);
    }

    [Fact]
    public void TwoExpertsTakingEverything_IsARouterCollapse()
    {
        // [0, 500, 0, 500]: the top-2 share is 1000/1000 = 100% > 90% (uniform: 2/4 = 50%); max/mean = 500/250 = 2.
        var m = new HealthMonitor(Settings, TextWriter.Null).StepEnded(Step(1, routed: [0, 500, 0, 500]));
        Assert.Equal([HealthSignal.LoadImbalance, HealthSignal.RouterCollapse], m.Warnings.Select(w => w.Signal));
        Assert.StartsWith("router collapse in layer 0: experts 1, 3 take 100 % of the layer's assignments (step 1; uniform routing gives 50 %), above Health.CollapseShare 90 %", m.Warnings[1].Message);
    }

    [Fact]
    public void LowMemoryHeadroom_GivesTheTutorialsOrderOfRemedies()
    {
        // 76 of 80 GiB in use: 4/80 = 5% free < 10%.
        var m = new HealthMonitor(Settings, TextWriter.Null).StepEnded(Step(1) with { MemoryUsedBytes = 76L << 30, MemoryTotalBytes = 80L << 30 });
        var w = Assert.Single(m.Warnings);
        Assert.Equal("device memory headroom 5.0 % (76.0 of 80.0 GiB in use) is below Health.MinMemoryHeadroom 10 %: lower Capacity.Factor (now 1.5), then set Capacity.PadToCapacity = false, then lower Training.MicroBatchSize (now 4); keep Training.GlobalBatchSize, which sets the learning-rate schedule's tokens per step", w.Message);
        Assert.StartsWith("lower Training.MicroBatchSize (now 4)", HealthMonitor.MemoryRemedy(Settings with { Capacity = Capacity.Dropless }));
    }

    [Fact]
    public void AllToAllDominatingTheStep_Warns()
    {
        // 0.7 s of a 1 s step: 70% > 50%.
        var m = new HealthMonitor(Settings, TextWriter.Null).StepEnded(Step(1) with { AllToAllSeconds = 0.7 });
        Assert.StartsWith("the expert-parallel all-to-all takes 70 % of the step (step 1), above Health.MaxAllToAllShare 50 %", Assert.Single(m.Warnings).Message);
    }

    [Fact]
    public void FlatLoss_IsNotDecreasing_AndStopsTheRunWhenAsked()
    {
        var s = Settings with { Health = Settings.Health with { LossWindow = 2, StopOn = HealthSignal.Loss } };
        var monitor = new HealthMonitor(s, TextWriter.Null);
        // Losses 3, 2, 2, 2: steps 1–2 mean 2.5 → steps 3–4 mean 2.0 falls; steps 2–3 (2.0) → 4–5 (2.0) does not.
        var results = new[] { 3.0, 2.0, 2.0, 2.0, 2.0 }.Select((l, i) => monitor.StepEnded(Step(i + 1, lm: l))).ToArray();
        Assert.All(results.Take(4), r => Assert.Null(r.StopReason));
        Assert.Equal(HealthSignal.Loss, Assert.Single(results[4].Warnings).Signal);
        Assert.StartsWith("training loss is not decreasing: mean lm loss 2.0000 over steps 4–5 vs 2.0000 over steps 2–3 (Health.LossWindow 2); lower Training.LearningRate", results[4].Warnings[0].Message);
        Assert.StartsWith("Stopped after step 5 because Loss is in Health.StopOn", results[4].StopReason);
    }

    /// <summary>TinyMixtral shrunk as in TrainerTests: 2 layers, sequences of 64, 4 samples a step.</summary>
    private static RecipeSettings Tiny(int steps) => TrainCommand.ResolvePaths(new Moe.Recipes.TinyMixtral().ToSettings() with
    {
        Model = Model.TinyMixtral with { Layers = 2 },
        Data = new Moe.Recipes.TinyMixtral().Data with { SequenceLength = 64 },
        Training = new Moe.Recipes.TinyMixtral().Training with { Steps = steps, WarmupSteps = 1, GlobalBatchSize = 4, MicroBatchSize = 2 },
    });

    private static (TrainResult Result, string Output) Train(RecipeSettings s, ISampleSource? data = null)
    {
        var output = new StringWriter();
        using var source = data is null ? new IndexedSampleSource(s, s.Model.EosTokenId) : null;
        using var trainer = new Trainer(s, CPU, TextWriter.Null);
        var result = trainer.Run(data ?? source!, new TrainingObservers(new HealthMonitor(s, output)));
        return (result, output.ToString());
    }

    [Fact]
    public void TinyMixtralWithASmallCapacityFactor_WarnsOfDropsNamingCapacityFactor()
    {
        var (result, output) = Train(Tiny(2) with { Capacity = new Capacity { Factor = 0.5 } });
        Assert.Contains("health warning [DropRate] step 1: token drop rate", output);
        Assert.Contains("raise Capacity.Factor gradually (now 0.5; e.g. 0.625)", output);
        Assert.Contains(result.Steps[0].Warnings, w => w.Signal == HealthSignal.DropRate);
        Assert.DoesNotContain(result.Steps[1].Warnings, w => w.Signal == HealthSignal.DropRate);   // same episode: no second warning
    }

    [Fact]
    public void TinyMixtralWithItsRouterForcedToCollapse_WarnsOfImbalanceAndCollapse()
    {
        // Every position holds the same token, so every hidden state is the same (attention averages equal values),
        // and every router sends every token to the same two experts: top-2 share 100%, max/mean 4/2 = 2.
        var s = Tiny(2);
        var (result, output) = Train(s, new ConstantTokens(s.Data.SequenceLength, token: 7));
        Assert.Contains("health warning [LoadImbalance] step 1: expert load imbalance 2.00", output);
        Assert.Contains("health warning [RouterCollapse] step 1: router collapse in layer 0", output);
        Assert.Contains("take 100 % of the layer's assignments", output);
        Assert.Contains("raise Router.AuxLossCoeff", output);
        Assert.Null(result.StopReason);
    }

    [Fact]
    public void ASignalInStopOn_StopsTheRunAfterThatStep()
    {
        var s = Tiny(5) with { Capacity = new Capacity { Factor = 0.5 }, Health = new Health { StopOn = HealthSignal.DropRate } };
        var (result, _) = Train(s);
        Assert.Single(result.Steps);
        Assert.StartsWith("Stopped after step 1 because DropRate is in Health.StopOn: token drop rate", result.StopReason);
    }

    private sealed class ConstantTokens(int sequence, long token) : ISampleSource
    {
        public GptSample Sample(long index) => new(
            Enumerable.Repeat(token, sequence).ToArray(), Enumerable.Repeat(token, sequence).ToArray(),
            Enumerable.Repeat(1f, sequence).ToArray(), Enumerable.Range(0, sequence).Select(i => (long)i).ToArray(), new long[sequence]);

        public void Dispose()
        {
        }
    }
}
