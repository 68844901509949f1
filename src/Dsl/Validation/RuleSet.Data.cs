using System.Collections.Generic;
using static Moe.Dsl.Validation.Arithmetic;

namespace Moe.Dsl.Validation;

public static partial class RuleSet
{
    private const RuleCategory DataCat = RuleCategory.DataAndTraining;

    private static IEnumerable<Rule> DataRules()
    {
        // MOE0201 (R047, R048).
        var batch = D(DiagnosticIds.BatchSizeNotPositive, "Batch sizes must be at least 1", DataCat, "R047, R048",
            "Training.MicroBatchSize", "Training.GlobalBatchSize");
        yield return new Rule(batch, (s, _) => BatchFindings(batch, s.Training));

        // MOE0202 (R049): DP here is the dense data-parallel size.
        var gbs = D(DiagnosticIds.GlobalBatchNotDivisible, "GlobalBatchSize must be a multiple of MicroBatchSize × data parallel", DataCat, "R049",
            "Training.GlobalBatchSize", "Training.MicroBatchSize", "Parallelism.Gpus", "Parallelism.Tensor", "Parallelism.Pipeline", "Parallelism.Context");
        yield return new Rule(gbs, (s, _) =>
        {
            var t = s.Training;
            int dp = s.Parallelism.DataParallel;
            if (t.MicroBatchSize < 1 || t.GlobalBatchSize < 1 || dp < 1) return None;
            int step = t.MicroBatchSize * dp;
            if (t.GlobalBatchSize % step == 0) return None;
            return One(gbs,
                $"GlobalBatchSize ({F(t.GlobalBatchSize)}) must be a multiple of MicroBatchSize × data parallel = {F(t.MicroBatchSize)} × {F(dp)} = {F(step)} " +
                $"(data parallel = Gpus / (Tensor·Pipeline·Context) = {F(s.Parallelism.Gpus)} / {F(s.Parallelism.ModelParallelProduct)}); valid GlobalBatchSize near {F(t.GlobalBatchSize)}: {Join(NeighbouringMultiples(t.GlobalBatchSize, step))}",
                SetFix("Training.GlobalBatchSize", CeilMultiple(t.GlobalBatchSize, step)), "Training.GlobalBatchSize");
        });

        // MOE0203 (R051): Megatron raises at the first training step.
        var interleaved = D(DiagnosticIds.InterleavedMicrobatches, "The interleaved schedule needs micro-batches that are a multiple of Pipeline", DataCat, "R051",
            "Parallelism.VirtualPipeline", "Parallelism.Pipeline", "Parallelism.Gpus", "Parallelism.Tensor", "Parallelism.Context", "Training.GlobalBatchSize", "Training.MicroBatchSize");
        yield return new Rule(interleaved, (s, _) =>
        {
            var p = s.Parallelism;
            int m = s.GradientAccumulationSteps;
            if (p.VirtualPipeline is not int v || v <= 1 || p.Pipeline <= 1 || m == 0) return None;
            if (m >= p.Pipeline && m % p.Pipeline == 0) return None;
            int step = s.Training.MicroBatchSize * p.DataParallel * p.Pipeline;
            return One(interleaved,
                $"With VirtualPipeline ({F(v)}) the micro-batches per step (GlobalBatchSize / (MicroBatchSize × data parallel) = {F(m)}) must be at least Pipeline ({F(p.Pipeline)}) and a multiple of it; " +
                $"valid GlobalBatchSize: multiples of {F(step)}, e.g. {Join(NeighbouringMultiples(s.Training.GlobalBatchSize, step))}",
                SetFix("Training.GlobalBatchSize", CeilMultiple(s.Training.GlobalBatchSize, step)), "Training.GlobalBatchSize");
        });

        // MOE0204 (R053).
        var positions = D(DiagnosticIds.SequenceLongerThanPositions, "SequenceLength must not exceed the model's positions", DataCat, "R053",
            "Data.SequenceLength", "Model.MaxPositionEmbeddings", "Model.Name");
        yield return new Rule(positions, (s, _) => s.Data.SequenceLength > s.Model.MaxPositionEmbeddings && s.Model.MaxPositionEmbeddings > 0
            ? One(positions, $"SequenceLength ({F(s.Data.SequenceLength)}) exceeds the {F(s.Model.MaxPositionEmbeddings)} positions of {s.Model.Name}",
                SetFix("Data.SequenceLength", s.Model.MaxPositionEmbeddings), "Data.SequenceLength")
            : None);

        // MOE0205 (R127).
        var split = D(DiagnosticIds.InvalidSplit, "Split must be up to three non-negative weights", DataCat, "R127",
            "Data.Split");
        yield return new Rule(split, (s, ctx) => DataSplit.TryParse(s.Data.Split, out _, out string error)
            ? None
            : One(split, $"Split \"{s.Data.Split}\" is invalid: {error}", null, "Data.Split"));

        // MOE0206 (R030): load-balanced causal chunks, two per context rank.
        var cp = D(DiagnosticIds.SequenceNotDivisibleForContext, "SequenceLength must be a multiple of 2 × Context", DataCat, "R030",
            "Data.SequenceLength", "Parallelism.Context");
        yield return new Rule(cp, (s, _) =>
        {
            int c = s.Parallelism.Context, len = s.Data.SequenceLength;
            if (c <= 1 || len < 1 || len % (2 * c) == 0) return None;
            return One(cp, $"SequenceLength ({F(len)}) must be a multiple of 2 × Context = {F(2 * c)} (each context rank takes two balanced chunks); valid near {F(len)}: {Join(NeighbouringMultiples(len, 2 * c))}",
                SetFix("Data.SequenceLength", CeilMultiple(len, 2 * c)), "Data.SequenceLength");
        });

        // MOE0207 (R029): Megatron asserts inside the scatter at run time.
        var sp = D(DiagnosticIds.SequenceNotDivisibleForSequenceParallel, "With sequence parallel, SequenceLength / Context must be a multiple of Tensor", DataCat, "R029",
            "Data.SequenceLength", "Parallelism.Context", "Parallelism.Tensor", "Parallelism.SequenceParallel");
        yield return new Rule(sp, (s, _) =>
        {
            var p = s.Parallelism;
            int len = s.Data.SequenceLength;
            if (!p.SequenceParallel || p.Tensor <= 1 || p.Context < 1 || len < 1 || len % p.Context != 0) return None;
            int perRank = len / p.Context;
            if (perRank % p.Tensor == 0) return None;
            int step = p.Context * p.Tensor;
            return One(sp, $"With sequence parallel, SequenceLength / Context = {F(len)} / {F(p.Context)} = {F(perRank)} must be a multiple of Tensor ({F(p.Tensor)}); valid SequenceLength near {F(len)}: {Join(NeighbouringMultiples(len, step))}",
                SetFix("Data.SequenceLength", CeilMultiple(len, step)), "Data.SequenceLength");
        });

        // MOE0208 (Moe): optimizer and schedule ranges.
        var opt = D(DiagnosticIds.OptimizerSettingInvalid, "Optimizer settings must be in range", DataCat, "Moe",
            "Training");
        yield return new Rule(opt, (s, _) => OptimizerFindings(opt, s.Training));

        // MOE0209 (Moe).
        var seq = D(DiagnosticIds.SequenceLengthNotPositive, "SequenceLength must be at least 1", DataCat, "Moe",
            "Data.SequenceLength");
        yield return new Rule(seq, (s, _) => s.Data.SequenceLength < 1
            ? One(seq, $"SequenceLength ({F(s.Data.SequenceLength)}) must be at least 1", null, "Data.SequenceLength")
            : None);

        // MOE0210 (Moe).
        var interval = D(DiagnosticIds.CheckpointIntervalInvalid, "Checkpoint interval and KeepLast must be positive and need Save", DataCat, "Moe",
            "Checkpoint.Interval", "Checkpoint.KeepLast", "Checkpoint.Save");
        yield return new Rule(interval, (s, _) => CheckpointFindings(interval, s.Checkpoint));

        // MOE0211 (Moe): health bounds that are out of range, would fire on healthy routing, or can never fire.
        var health = D(DiagnosticIds.HealthSettingInvalid, "Health bounds must be in range and able to fire", DataCat, "Moe",
            "Health", "Router.TopK", "Model.Experts", "Model.ExpertsPerToken");
        yield return new Rule(health, (s, _) => HealthFindings(health, s));

        // MOE0212 (Moe): Megatron silently skips evaluation when the split gives validation no weight.
        var eval = D(DiagnosticIds.EvaluationSettingInvalid, "Evaluation needs a positive interval, iterations and a validation split", DataCat, "Moe",
            "Training.EvalInterval", "Training.EvalIters", "Data.Split");
        yield return new Rule(eval, (s, _) => EvaluationFindings(eval, s));

        // MOE0213 (Moe): a short trial run keeps the recipe's warm-up; the runtime caps it at Steps.
        var warmup = W(DiagnosticIds.WarmupLongerThanRun, "WarmupSteps longer than the run is capped at Steps", DataCat, "Moe",
            "Training.WarmupSteps", "Training.Steps");
        yield return new Rule(warmup, (s, _) =>
        {
            var t = s.Training;
            if (t.Steps < 1 || t.WarmupSteps <= t.Steps) return None;
            return One(warmup, $"WarmupSteps ({F(t.WarmupSteps)}) exceeds Steps ({F(t.Steps)}): the warm-up is capped at {F(t.Steps)} steps, so the learning rate reaches its peak only at the last step",
                SetFix("Training.WarmupSteps", t.Steps), "Training.WarmupSteps");
        });
    }

    private static IEnumerable<Finding> CheckpointFindings(RuleDescriptor d, Checkpoint c)
    {
        if (c.Interval is int i)
        {
            if (i < 1) yield return new Finding(d, $"Checkpoint Interval ({F(i)}) must be at least 1 step", new[] { "Checkpoint.Interval" });
            else if (c.Save is null) yield return new Finding(d, $"Checkpoint Interval ({F(i)}) has nowhere to save: set Save to a directory", new[] { "Checkpoint.Interval", "Checkpoint.Save" });
        }
        if (c.KeepLast is int k)
        {
            if (k < 1) yield return new Finding(d, $"Checkpoint KeepLast ({F(k)}) must be at least 1 (null keeps every checkpoint)", new[] { "Checkpoint.KeepLast" });
            else if (c.Save is null) yield return new Finding(d, $"Checkpoint KeepLast ({F(k)}) has no checkpoints to keep: set Save to a directory", new[] { "Checkpoint.KeepLast", "Checkpoint.Save" });
        }
    }

    private static IEnumerable<Finding> HealthFindings(RuleDescriptor d, RecipeSettings s)
    {
        var h = s.Health;
        Finding Bad(string name, string message) => new(d, message, new[] { "Health." + name });
        if (h.Window < 1) yield return Bad("Window", $"Health Window ({F(h.Window)}) must be at least 1 step");
        if (h.LossWindow is int lw && lw < 1) yield return Bad("LossWindow", $"Health LossWindow ({F(lw)}) must be at least 1 step (null switches the loss check off)");
        if (h.MaxDropRate is double drop && !(drop >= 0 && drop < 1))
            yield return Bad("MaxDropRate", $"Health MaxDropRate ({F(drop)}) must be in [0, 1): it is the share of routed tokens dropped");
        int experts = s.Model.Experts, k = s.TopK;
        bool routing = experts >= 1 && k >= 1 && k <= experts;
        if (h.MaxLoadImbalance is double imb)
        {
            if (!(imb > 1))
                yield return Bad("MaxLoadImbalance", $"Health MaxLoadImbalance ({F(imb)}) must be above 1: the busiest expert always carries at least its layer's mean, so the check would fire on perfectly uniform routing");
            else if (routing && imb >= (double)experts / k)
                yield return Bad("MaxLoadImbalance", $"Health MaxLoadImbalance ({F(imb)}) can never be exceeded: with top-{F(k)} of {F(experts)} experts the busiest expert carries at most Experts / TopK = {F(experts)} / {F(k)} = {F((double)experts / k)} times the mean; choose a bound between 1 and {F((double)experts / k)}");
        }
        if (h.CollapseShare is double share && routing)
        {
            double uniform = (double)k / experts;
            if (!(share > uniform && share <= 1))
                yield return Bad("CollapseShare", $"Health CollapseShare ({F(share)}) must be above the uniform share TopK / Experts = {F(k)} / {F(experts)} = {F(uniform)} and at most 1: the {F(k)} busiest experts always take at least {F(uniform)} of the assignments");
        }
        if (h.MinMemoryHeadroom is double mem && !(mem >= 0 && mem < 1))
            yield return Bad("MinMemoryHeadroom", $"Health MinMemoryHeadroom ({F(mem)}) must be in [0, 1): it is the share of device memory left free");
        if (h.MaxAllToAllShare is double a2a && !(a2a > 0 && a2a <= 1))
            yield return Bad("MaxAllToAllShare", $"Health MaxAllToAllShare ({F(a2a)}) must be in (0, 1]: it is the share of the step spent in the all-to-all");
        foreach (var (signal, bound, isSet) in new[]
        {
            (HealthSignal.Loss, "LossWindow", h.LossWindow is not null),
            (HealthSignal.DropRate, "MaxDropRate", h.MaxDropRate is not null),
            (HealthSignal.LoadImbalance, "MaxLoadImbalance", h.MaxLoadImbalance is not null),
            (HealthSignal.RouterCollapse, "CollapseShare", h.CollapseShare is not null),
            (HealthSignal.MemoryHeadroom, "MinMemoryHeadroom", h.MinMemoryHeadroom is not null),
            (HealthSignal.AllToAll, "MaxAllToAllShare", h.MaxAllToAllShare is not null),
        })
        {
            if ((h.StopOn & signal) != 0 && !isSet)
                yield return new Finding(d, $"Health StopOn includes {signal} but {bound} is null, so that check is off and can never stop the run: set {bound} or remove {signal} from StopOn", new[] { "Health.StopOn", "Health." + bound });
        }
        if (string.IsNullOrWhiteSpace(h.TensorBoardDir))
            yield return Bad("TensorBoardDir", "Health TensorBoardDir must name a directory (relative paths are inside the run directory)");
    }

    private static IEnumerable<Finding> EvaluationFindings(RuleDescriptor d, RecipeSettings s)
    {
        var t = s.Training;
        if (t.EvalInterval is not int interval) yield break;
        if (interval < 1)
            yield return new Finding(d, $"EvalInterval ({F(interval)}) must be at least 1 step (null: no evaluation)", new[] { "Training.EvalInterval" });
        if (t.EvalIters < 1)
            yield return new Finding(d, $"EvalIters ({F(t.EvalIters)}) must be at least 1 global batch per evaluation", new[] { "Training.EvalIters" }, SetFix("Training.EvalIters", 1));
        if (DataSplit.TryParse(s.Data.Split, out var w, out _) && !(w[1] > 0))
            yield return new Finding(d, $"EvalInterval ({F(interval)}) evaluates the validation split, but Split \"{s.Data.Split}\" gives it no weight: add a second weight to Split (e.g. \"98,2,0\") or set EvalInterval = null",
                new[] { "Training.EvalInterval", "Data.Split" });
    }

    private static IEnumerable<Finding> BatchFindings(RuleDescriptor d, Training t)
    {
        if (t.MicroBatchSize < 1)
            yield return new Finding(d, $"MicroBatchSize ({F(t.MicroBatchSize)}) must be at least 1", new[] { "Training.MicroBatchSize" }, SetFix("Training.MicroBatchSize", 1));
        if (t.GlobalBatchSize < 1)
            yield return new Finding(d, $"GlobalBatchSize ({F(t.GlobalBatchSize)}) must be at least 1", new[] { "Training.GlobalBatchSize" });
    }

    private static IEnumerable<Finding> OptimizerFindings(RuleDescriptor d, Training t)
    {
        Finding Bad(string name, string why) => new(d, $"{name} {why}", new[] { "Training." + name.Substring(0, name.IndexOf(' ') < 0 ? name.Length : name.IndexOf(' ')) });
        if (t.Steps < 1) yield return Bad("Steps", $"({F(t.Steps)}) must be at least 1");
        if (!(t.LearningRate > 0)) yield return Bad("LearningRate", $"({F(t.LearningRate)}) must be positive");
        if (t.MinLearningRate < 0 || t.MinLearningRate > t.LearningRate)
            yield return Bad("MinLearningRate", $"({F(t.MinLearningRate)}) must be between 0 and LearningRate ({F(t.LearningRate)})");
        if (t.WarmupSteps < 0) yield return Bad("WarmupSteps", $"({F(t.WarmupSteps)}) must not be negative (0: no warm-up)");
        if (t.WeightDecay < 0) yield return Bad("WeightDecay", $"({F(t.WeightDecay)}) must not be negative");
        if (t.AdamBeta1 < 0 || t.AdamBeta1 >= 1) yield return Bad("AdamBeta1", $"({F(t.AdamBeta1)}) must be in [0, 1)");
        if (t.AdamBeta2 < 0 || t.AdamBeta2 >= 1) yield return Bad("AdamBeta2", $"({F(t.AdamBeta2)}) must be in [0, 1)");
        if (!(t.AdamEps > 0)) yield return Bad("AdamEps", $"({F(t.AdamEps)}) must be positive");
        if (t.ClipGrad < 0) yield return Bad("ClipGrad", $"({F(t.ClipGrad)}) must not be negative (0 disables clipping)");
        if (!(t.DistributedTimeoutMinutes > 0)) yield return Bad("DistributedTimeoutMinutes", $"({F(t.DistributedTimeoutMinutes)}) must be positive");
    }
}
