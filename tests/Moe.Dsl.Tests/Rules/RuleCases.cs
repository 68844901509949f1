using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Dsl.Validation;

namespace Moe.Dsl.Tests.Rules;

/// <summary>
/// For every rule of the rule set: a recipe that violates it (with the setting to blame and words the
/// message must contain) and a nearby recipe that does not. Expected numbers come from the model cards
/// and hand arithmetic, not from the rule set.
/// </summary>
public static class RuleCases
{
    /// <summary>A valid base: Mixtral 8x7B on 32 GPUs, EP 8 (the Mixtral8x7b recipe's layout).</summary>
    public static RecipeSettings Base { get; } = new()
    {
        Name = "Case",
        Model = Model.Mixtral8x7B,
        Parallelism = new Parallelism { Gpus = 32, Expert = 8 },
        Data = new Data { SequenceLength = 4096, Split = "990,9,1" },
        Training = new Training { GlobalBatchSize = 128, MicroBatchSize = 1, Steps = 100 },
    };

    public sealed record Case(string Id, string Path, string[] MessageParts, RecipeSettings Violating, RecipeSettings Passing)
    {
        public override string ToString() => Id + " " + Path;
    }

    private static RecipeSettings P(Func<Parallelism, Parallelism> f, RecipeSettings? s = null) { s ??= Base; return s with { Parallelism = f(s.Parallelism) }; }
    private static RecipeSettings R(Func<Router, Router> f, RecipeSettings? s = null) { s ??= Base; return s with { Router = f(s.Router) }; }
    private static RecipeSettings C(Func<Capacity, Capacity> f) => Base with { Capacity = f(Base.Capacity) };
    private static RecipeSettings T(Func<Training, Training> f, RecipeSettings? s = null) { s ??= Base; return s with { Training = f(s.Training) }; }
    private static RecipeSettings Dt(Func<Data, Data> f, RecipeSettings? s = null) { s ??= Base; return s with { Data = f(s.Data) }; }
    private static RecipeSettings M(Func<Model, Model> f) => Base with { Model = f(Base.Model) };
    private static readonly RecipeSettings X22 = Base with { Model = Model.Mixtral8x22B };

    public static IEnumerable<Case> All()
    {
        yield return new(DiagnosticIds.SizeNotPositive, "Parallelism.Tensor", ["Tensor (0) must be at least 1"],
            P(p => p with { Tensor = 0 }), P(p => p with { Tensor = 1 }));
        yield return new(DiagnosticIds.SizeNotPositive, "Parallelism.Gpus", ["Gpus (-8) must be at least 1"],
            P(p => p with { Gpus = -8 }), Base);
        yield return new(DiagnosticIds.GpusNotDivisibleByModelParallel, "Parallelism.Gpus",
            ["Gpus (30) must be a multiple of Tensor × Pipeline × Context = 4 × 1 × 1 = 4", "valid Gpus near 30: 32"],
            P(p => p with { Gpus = 30, Tensor = 4, Expert = 8, SequenceParallel = true }), P(p => p with { Gpus = 32, Tensor = 4, SequenceParallel = true }));
        yield return new(DiagnosticIds.ExpertNotDividingExperts, "Parallelism.Expert",
            ["Expert (16) must divide the 8 experts of Mixtral 8x22B; valid: 1, 2, 4, 8"],
            P(p => p with { Expert = 16 }, X22), P(p => p with { Expert = 8 }, X22));
        yield return new(DiagnosticIds.GpusNotDivisibleByExpertParallel, "Parallelism.Gpus",
            ["Gpus (20) must be a multiple of ExpertTensor × Expert × Pipeline = 1 × 8 × 1 = 8", "(Megatron finds this only after launch; ExpertTensor defaults to Tensor)", "valid Gpus near 20: 16, 24"],
            P(p => p with { Gpus = 20, Expert = 8 }), P(p => p with { Gpus = 24, Expert = 8 }));
        yield return new(DiagnosticIds.ExpertDataParallelMismatch, "Parallelism.Order",
            ["expert data parallel (32 / (1·8·2) = 2) must equal data parallel (32 / (1·1·2) = 16)"],
            P(p => p with { Pipeline = 2, Order = RankOrder.TpCpEpPpDp }), P(p => p with { Pipeline = 2, Order = RankOrder.TpCpEpDpPp }));
        yield return new(DiagnosticIds.TensorNotDividingHeads, "Parallelism.Tensor",
            ["Tensor (3) must divide the 32 attention heads of Mixtral 8x7B; valid: 1, 2, 4, 8, 16, 32"],
            P(p => p with { Gpus = 48, Tensor = 3, SequenceParallel = true, Expert = 8 }), P(p => p with { Tensor = 4, SequenceParallel = true }));
        yield return new(DiagnosticIds.TensorIncompatibleWithKeyValueHeads, "Parallelism.Tensor",
            ["Tensor (12) and the 8 key-value heads of Mixtral 8x22B must be multiples or divisors of one another", "valid Tensor: 1, 2, 4, 8, 16, 24, 48"],
            P(p => p with { Gpus = 96, Tensor = 12, SequenceParallel = true }, X22), P(p => p with { Gpus = 32, Tensor = 16, SequenceParallel = true, Expert = 2 }, X22));
        yield return new(DiagnosticIds.ExpertTensorNotDividingFfn, "Parallelism.ExpertTensor",
            ["ExpertTensor (3) must divide the expert FFN size 14336 of Mixtral 8x7B"],
            P(p => p with { Gpus = 24, Expert = 8, ExpertTensor = 3 }), P(p => p with { Expert = 8, ExpertTensor = 4 }));
        yield return new(DiagnosticIds.SequenceParallelWithoutTensor, "Parallelism.SequenceParallel",
            ["SequenceParallel = true needs Tensor > 1"],
            P(p => p with { SequenceParallel = true }), Base);
        yield return new(DiagnosticIds.TensorParallelMoeNeedsSequenceParallel, "Parallelism.SequenceParallel",
            ["Tensor (2) > 1 in an MoE model needs SequenceParallel = true"],
            P(p => p with { Tensor = 2 }), P(p => p with { Tensor = 2, SequenceParallel = true }));
        yield return new(DiagnosticIds.PipelineNotDividingLayers, "Parallelism.Pipeline",
            ["Pipeline (3) must divide the 56 layers of Mixtral 8x22B", "valid: 1, 2, 4, 7, 8, 14, 28, 56"],
            P(p => p with { Gpus = 48, Pipeline = 3, Expert = 8 }, X22), P(p => p with { Gpus = 48, Pipeline = 3, Expert = 8, FirstStageLayers = 20, LastStageLayers = 20 }, X22));
        yield return new(DiagnosticIds.VirtualPipelineWithoutPipeline, "Parallelism.VirtualPipeline",
            ["VirtualPipeline (2) interleaves stages of a pipeline, but Pipeline is 1"],
            P(p => p with { VirtualPipeline = 2 }), P(p => p with { VirtualPipeline = 2, Pipeline = 2 }));
        yield return new(DiagnosticIds.VirtualPipelineNotDividingStage, "Parallelism.VirtualPipeline",
            ["VirtualPipeline (3) must divide the layers of every pipeline stage (8, 8, 8, 8)", "valid: 2, 4, 8"],
            P(p => p with { Pipeline = 4, VirtualPipeline = 3 }), P(p => p with { Pipeline = 4, VirtualPipeline = 4 }));
        yield return new(DiagnosticIds.UnevenPipelineInvalid, "Parallelism.FirstStageLayers",
            ["32 layers − 10 on the first/last stage = 22 layers for 3 middle stage(s)", "3 does not divide 22"],
            P(p => p with { Pipeline = 4, FirstStageLayers = 10 }), P(p => p with { Pipeline = 4, FirstStageLayers = 8 }));
        yield return new(DiagnosticIds.ModelDimensionsInvalid, "Model.KeyValueHeads",
            ["AttentionHeads (32) of Mixtral 8x7B must be a multiple of KeyValueHeads (6)"],
            M(m => m with { KeyValueHeads = 6 }), M(m => m with { KeyValueHeads = 4 }));

        yield return new(DiagnosticIds.TopKOutOfRange, "Router.TopK",
            ["TopK (9) must be between 1 and the 8 experts of Mixtral 8x7B"],
            R(r => r with { TopK = 9 }), R(r => r with { TopK = 8 }));
        yield return new(DiagnosticIds.TopKOneNeedsPreSoftmax, "Router.PreSoftmax",
            ["TopK = 1 with softmax scoring after top-k", "set PreSoftmax = true"],
            R(r => r with { TopK = 1 }), R(r => r with { TopK = 1, PreSoftmax = true }));
        yield return new(DiagnosticIds.PreSoftmaxIgnoredWithSigmoid, "Router.PreSoftmax",
            ["PreSoftmax = true is ignored with ScoreFunction = Sigmoid"],
            R(r => r with { PreSoftmax = true, ScoreFunction = ScoreFunction.Sigmoid }), R(r => r with { ScoreFunction = ScoreFunction.Sigmoid }));
        yield return new(DiagnosticIds.GroupLimitedRoutingIncomplete, "Router.NumGroups",
            ["NumGroups (3) must divide the 8 experts of Mixtral 8x7B; valid: 1, 2, 4, 8"],
            R(r => r with { NumGroups = 3, GroupTopK = 1 }), R(r => r with { NumGroups = 4, GroupTopK = 2 }));
        yield return new(DiagnosticIds.GroupLimitedRoutingArithmetic, "Router.GroupTopK",
            ["TopK (3) exceeds the experts in the kept groups: GroupTopK × experts per group = 2 × 1 = 2"],
            R(r => r with { TopK = 3, NumGroups = 8, GroupTopK = 2 }), R(r => r with { TopK = 2, NumGroups = 8, GroupTopK = 2 }));
        yield return new(DiagnosticIds.GroupLimitedRoutingArithmetic, "Router.GroupTopK",
            ["TopK / GroupTopK = 2 / 1 = 2 exceeds the experts per group (8 / 8 = 1)"],
            R(r => r with { NumGroups = 8, GroupTopK = 1 }), R(r => r with { NumGroups = 4, GroupTopK = 1 }));
        yield return new(DiagnosticIds.NumGroupsWithoutGroupTopK, "Router.NumGroups",
            ["NumGroups (4) is ignored without GroupTopK"],
            R(r => r with { NumGroups = 4 }), R(r => r with { NumGroups = 4, GroupTopK = 2 }));
        yield return new(DiagnosticIds.AuxLossCoeffUnused, "Router.AuxLossCoeff",
            ["AuxLossCoeff (0.01) is never used because LoadBalancing = None"],
            R(r => r with { LoadBalancing = LoadBalancing.None, AuxLossCoeff = 0.01 }), R(r => r with { LoadBalancing = LoadBalancing.None }));
        yield return new(DiagnosticIds.NegativeLossCoefficient, "Router.ZLossCoeff",
            ["ZLossCoeff (-0.001) must not be negative"],
            R(r => r with { ZLossCoeff = -0.001 }), R(r => r with { ZLossCoeff = 0.001 }));
        yield return new(DiagnosticIds.CapacityFactorNotPositive, "Capacity.Factor",
            ["Capacity factor (-1) must be positive"],
            C(c => c with { Factor = -1 }), C(c => c with { Factor = 1.25 }));
        yield return new(DiagnosticIds.PadToCapacityWithoutFactor, "Capacity.PadToCapacity",
            ["PadToCapacity = true needs a capacity Factor"],
            C(c => c with { PadToCapacity = true }), C(c => c with { PadToCapacity = true, Factor = 1.0 }));

        yield return new(DiagnosticIds.BatchSizeNotPositive, "Training.MicroBatchSize",
            ["MicroBatchSize (0) must be at least 1"],
            T(t => t with { MicroBatchSize = 0 }), T(t => t with { MicroBatchSize = 2 }));
        yield return new(DiagnosticIds.GlobalBatchNotDivisible, "Training.GlobalBatchSize",
            ["GlobalBatchSize (100) must be a multiple of MicroBatchSize × data parallel = 1 × 32 = 32", "valid GlobalBatchSize near 100: 96, 128"],
            T(t => t with { GlobalBatchSize = 100 }), T(t => t with { GlobalBatchSize = 96 }));
        yield return new(DiagnosticIds.InterleavedMicrobatches, "Training.GlobalBatchSize",
            ["the micro-batches per step (GlobalBatchSize / (MicroBatchSize × data parallel) = 6) must be at least Pipeline (4) and a multiple of it"],
            T(t => t with { GlobalBatchSize = 48 }, P(p => p with { Pipeline = 4, VirtualPipeline = 2 })), T(t => t with { GlobalBatchSize = 64 }, P(p => p with { Pipeline = 4, VirtualPipeline = 2 })));
        yield return new(DiagnosticIds.SequenceLongerThanPositions, "Data.SequenceLength",
            ["SequenceLength (65536) exceeds the 32768 positions of Mixtral 8x7B"],
            Dt(d => d with { SequenceLength = 65536 }), Dt(d => d with { SequenceLength = 32768 }));
        yield return new(DiagnosticIds.InvalidSplit, "Data.Split",
            ["Split \"99,1,0,0\" is invalid: it has 4 weights"],
            Dt(d => d with { Split = "99,1,0,0" }), Dt(d => d with { Split = "99,1" }));
        yield return new(DiagnosticIds.SequenceNotDivisibleForContext, "Data.SequenceLength",
            ["SequenceLength (4098) must be a multiple of 2 × Context = 4"],
            Dt(d => d with { SequenceLength = 4098 }, P(p => p with { Context = 2 })), Dt(d => d with { SequenceLength = 4096 }, P(p => p with { Context = 2 })));
        yield return new(DiagnosticIds.SequenceNotDivisibleForSequenceParallel, "Data.SequenceLength",
            ["SequenceLength / Context = 4098 / 1 = 4098 must be a multiple of Tensor (4)"],
            Dt(d => d with { SequenceLength = 4098 }, P(p => p with { Tensor = 4, SequenceParallel = true })), Dt(d => d with { SequenceLength = 4100 }, P(p => p with { Tensor = 4, SequenceParallel = true })));
        yield return new(DiagnosticIds.OptimizerSettingInvalid, "Training.WarmupSteps",
            ["WarmupSteps (200) must be between 0 and Steps (100)"],
            T(t => t with { WarmupSteps = 200 }), T(t => t with { WarmupSteps = 100 }));
        yield return new(DiagnosticIds.SequenceLengthNotPositive, "Data.SequenceLength",
            ["SequenceLength (0) must be at least 1"],
            Dt(d => d with { SequenceLength = 0 }), Dt(d => d with { SequenceLength = 1 }));
        yield return new(DiagnosticIds.CheckpointIntervalInvalid, "Checkpoint.Interval",
            ["Checkpoint Interval (100) has nowhere to save"],
            Base with { Checkpoint = new Checkpoint { Interval = 100 } }, Base with { Checkpoint = new Checkpoint { Interval = 100, Save = "ckpt" } });
        yield return new(DiagnosticIds.CheckpointIntervalInvalid, "Checkpoint.KeepLast",
            ["Checkpoint KeepLast (0) must be at least 1 (null keeps every checkpoint)"],
            Base with { Checkpoint = new Checkpoint { Save = "ckpt", KeepLast = 0 } }, Base with { Checkpoint = new Checkpoint { Save = "ckpt", KeepLast = 1 } });
    }
}
