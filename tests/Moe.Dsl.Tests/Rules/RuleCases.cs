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
    /// <summary>A valid base: Mixtral 8x7B on 32 H200s, EP 8 (about 105 GB per GPU: it would not fit an H100, see MOE0301).</summary>
    public static RecipeSettings Base { get; } = new()
    {
        Name = "Case",
        Model = Model.Mixtral8x7B,
        Parallelism = new Parallelism { Gpus = 32, Expert = 8, Gpu = Gpu.H200 },
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
    private static RecipeSettings H(Func<Health, Health> f) => Base with { Health = f(Base.Health) };
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
        yield return new(DiagnosticIds.ExpertBiasNeedsSigmoid, "Router.EnableExpertBias",
            ["EnableExpertBias = true needs ScoreFunction = Sigmoid", "with Softmax Megatron refuses it"],
            R(r => r with { EnableExpertBias = true }), R(r => r with { EnableExpertBias = true, ScoreFunction = ScoreFunction.Sigmoid }));
        yield return new(DiagnosticIds.BiasUpdateRateNotPositive, "Router.BiasUpdateRate",
            ["BiasUpdateRate (-0.001) must be a positive number"],
            R(r => r with { EnableExpertBias = true, ScoreFunction = ScoreFunction.Sigmoid, BiasUpdateRate = -1e-3 }),
            R(r => r with { EnableExpertBias = true, ScoreFunction = ScoreFunction.Sigmoid, BiasUpdateRate = 1e-3 }));
        yield return new(DiagnosticIds.BiasUpdateRateUnused, "Router.BiasUpdateRate",
            ["BiasUpdateRate (0.01) is never used because EnableExpertBias is false"],
            R(r => r with { ScoreFunction = ScoreFunction.Sigmoid, BiasUpdateRate = 0.01 }),
            R(r => r with { ScoreFunction = ScoreFunction.Sigmoid, EnableExpertBias = true, BiasUpdateRate = 0.01 }));

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
            ["WarmupSteps (-5) must not be negative (0: no warm-up)"],
            T(t => t with { WarmupSteps = -5 }), T(t => t with { WarmupSteps = 0 }));
        yield return new(DiagnosticIds.SequenceLengthNotPositive, "Data.SequenceLength",
            ["SequenceLength (0) must be at least 1"],
            Dt(d => d with { SequenceLength = 0 }), Dt(d => d with { SequenceLength = 1 }));
        yield return new(DiagnosticIds.CheckpointIntervalInvalid, "Checkpoint.Interval",
            ["Checkpoint Interval (100) has nowhere to save"],
            Base with { Checkpoint = new Checkpoint { Interval = 100 } }, Base with { Checkpoint = new Checkpoint { Interval = 100, Save = "ckpt" } });
        // Mixtral 8x7B routes top-2 of 8: max/mean is at most 8 / 2 = 4, the uniform top-2 share is 2 / 8 = 0.25.
        yield return new(DiagnosticIds.HealthSettingInvalid, "Health.MaxLoadImbalance",
            ["Health MaxLoadImbalance (4) can never be exceeded", "at most Experts / TopK = 8 / 2 = 4 times the mean; choose a bound between 1 and 4"],
            H(h => h with { MaxLoadImbalance = 4 }), H(h => h with { MaxLoadImbalance = 3.5 }));
        yield return new(DiagnosticIds.HealthSettingInvalid, "Health.MaxLoadImbalance",
            ["Health MaxLoadImbalance (1) must be above 1"],
            H(h => h with { MaxLoadImbalance = 1 }), H(h => h with { MaxLoadImbalance = 1.2 }));
        yield return new(DiagnosticIds.HealthSettingInvalid, "Health.CollapseShare",
            ["Health CollapseShare (0.25) must be above the uniform share TopK / Experts = 2 / 8 = 0.25 and at most 1"],
            H(h => h with { CollapseShare = 0.25 }), H(h => h with { CollapseShare = 0.3 }));
        yield return new(DiagnosticIds.HealthSettingInvalid, "Health.MaxDropRate",
            ["Health MaxDropRate (1) must be in [0, 1)"],
            H(h => h with { MaxDropRate = 1 }), H(h => h with { MaxDropRate = 0 }));
        yield return new(DiagnosticIds.HealthSettingInvalid, "Health.Window",
            ["Health Window (0) must be at least 1 step"],
            H(h => h with { Window = 0 }), H(h => h with { Window = 1 }));
        yield return new(DiagnosticIds.HealthSettingInvalid, "Health.MinMemoryHeadroom",
            ["Health MinMemoryHeadroom (-0.1) must be in [0, 1)"],
            H(h => h with { MinMemoryHeadroom = -0.1 }), H(h => h with { MinMemoryHeadroom = 0.2 }));
        yield return new(DiagnosticIds.HealthSettingInvalid, "Health.MaxAllToAllShare",
            ["Health MaxAllToAllShare (0) must be in (0, 1]"],
            H(h => h with { MaxAllToAllShare = 0 }), H(h => h with { MaxAllToAllShare = 1 }));
        yield return new(DiagnosticIds.EvaluationSettingInvalid, "Training.EvalInterval",
            ["EvalInterval (0) must be at least 1 step (null: no evaluation)"],
            T(t => t with { EvalInterval = 0 }), T(t => t with { EvalInterval = 1 }));
        yield return new(DiagnosticIds.EvaluationSettingInvalid, "Training.EvalIters",
            ["EvalIters (0) must be at least 1 global batch per evaluation"],
            T(t => t with { EvalIters = 0 }), T(t => t with { EvalIters = 1 }));
        yield return new(DiagnosticIds.EvaluationSettingInvalid, "Training.EvalInterval",
            ["EvalInterval (1000) evaluates the validation split, but Split \"100,0,0\" gives it no weight"],
            Dt(d => d with { Split = "100,0,0" }), Dt(d => d with { Split = "100,1,0" }));
        yield return new(DiagnosticIds.WarmupLongerThanRun, "Training.WarmupSteps",
            ["WarmupSteps (200) exceeds Steps (100): the warm-up is capped at 100 steps"],
            T(t => t with { WarmupSteps = 200 }), T(t => t with { WarmupSteps = 100 }));
        // By hand, per GPU of 8x7B with TP 1, PP 1, EP 8 on 32 GPUs (DP 32, expert DP 4), bf16 + Adam, 4096 tokens:
        // parameters: experts 32 layers × 3·4096·14336 = 5,637,144,576; dense 32 × (41,943,040 attention + 8,192 norms
        // + 32,768 router) + 2 × 32000·4096 embeddings + 4,096 = 1,605,636,096 → 7,242,780,672;
        // weights 2 B (14.49 GB) + gradients 4 B (28.97 GB) + optimizer 12 B sharded (dense /32, experts /4: 17.51 GB)
        // + activations (39.72 GB, below) + backward working set (0.94 GB, below) + 4 GB = 105.63 GB.
        // Activations (docs/memory.md), 32 layers, 4096 tokens, EP 8 at the default routing skew 1.5: rows
        // min(1.5·4096·2, 8·4096·1) = 12,288; per layer 4096·(22,528 + 4096) + 12,288·40,960 = 612,368,384 elements;
        // × 32 layers × 2 bytes = 39,191,576,576, + fp32 log-probabilities 4096·32,000·4 = 524,288,000 → 39.72 GB.
        // Backward working set: ∂gate/up of the 12,288 rows, 12,288·2·14,336·2 = 704,643,072 bytes, and the rank's one
        // expert's gate/up weight gradient in bf16, 2·14,336·4096·2 = 234,881,024 → 0.94 GB.
        yield return new(DiagnosticIds.PlanDoesNotFitGpu, "Parallelism.Gpu",
            ["The plan needs about 105.6 GB per GPU", "weights 14.5, gradients 29.0, optimizer state 17.5, activations 39.7, backward working set 0.9", "more than the H100's 80 GB", "It fits on H200, B200 (Gpu = Gpu.H200)"],
            P(p => p with { Gpu = Gpu.H100 }), P(p => p with { Gpu = Gpu.H200 }));
        yield return new(DiagnosticIds.CheckpointIntervalInvalid, "Checkpoint.KeepLast",
            ["Checkpoint KeepLast (0) must be at least 1 (null keeps every checkpoint)"],
            Base with { Checkpoint = new Checkpoint { Save = "ckpt", KeepLast = 0 } }, Base with { Checkpoint = new Checkpoint { Save = "ckpt", KeepLast = 1 } });
        // Recompute (R122, R123): 8x7B has 32 layers; with Pipeline 2 a stage holds 16.
        yield return new(DiagnosticIds.RecomputeFullIncomplete, "Recompute.Method",
            ["Granularity = Full needs a Method", "--recompute-method uniform|block"],
            Base with { Recompute = new Recompute { Granularity = RecomputeGranularity.Full, NumLayers = 1 } },
            Base with { Recompute = new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Block, NumLayers = 1 } });
        yield return new(DiagnosticIds.RecomputeFullIncomplete, "Recompute.NumLayers",
            ["NumLayers (17) must be between 1 and the 16 layers of a pipeline stage (32 layers / Pipeline 2)"],
            P(p => p with { Pipeline = 2 }) with { Recompute = new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Uniform, NumLayers = 17 } },
            P(p => p with { Pipeline = 2 }) with { Recompute = new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Uniform, NumLayers = 16 } });
        // Uneven stages (12 + 20 layers): Megatron clips NumLayers to each stage's layers, so the bound is the largest stage.
        yield return new(DiagnosticIds.RecomputeFullIncomplete, "Recompute.NumLayers",
            ["NumLayers (21) must be between 1 and the 20 layers of the largest pipeline stage (stages of 12, 20 layers)"],
            P(p => p with { Pipeline = 2, FirstStageLayers = 12 }) with { Recompute = new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Block, NumLayers = 21 } },
            P(p => p with { Pipeline = 2, FirstStageLayers = 12 }) with { Recompute = new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Block, NumLayers = 20 } });
        yield return new(DiagnosticIds.RecomputeMethodWithoutFull, "Recompute.NumLayers",
            ["NumLayers choose the layers of full recompute, but Granularity = Selective"],
            Base with { Recompute = new Recompute { Granularity = RecomputeGranularity.Selective, NumLayers = 2 } },
            Base with { Recompute = new Recompute { Granularity = RecomputeGranularity.Selective } });
        yield return new(DiagnosticIds.RecomputeMethodWithoutFull, "Recompute.Method",
            ["Method choose the layers of full recompute, but Granularity = None means no recompute"],
            Base with { Recompute = new Recompute { Method = RecomputeMethod.Block } }, Base);
        yield return new(DiagnosticIds.RecomputeModuleUnsupported, "Recompute.Modules",
            ["Modules cannot include Layernorm", "Valid: CoreAttn, MoeAct, Moe"],
            Base with { Recompute = new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.Layernorm } },
            Base with { Recompute = new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.Moe } });
        yield return new(DiagnosticIds.RecomputeModuleUnsupported, "Recompute.Modules",
            ["Modules cannot include Mlp (Mixtral has no dense MLP"],
            Base with { Recompute = new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.Mlp } },
            Base with { Recompute = new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.MoeAct } });
        // Routing skew: 8 experts, top-2 → at most 8 / 2 = 4.
        yield return new(DiagnosticIds.RoutingSkewOutOfRange, "Capacity.RoutingSkew",
            ["RoutingSkew (4.5) must be between 1", "E/k = 8/2 = 4"],
            C(c => c with { RoutingSkew = 4.5 }), C(c => c with { RoutingSkew = 4 }));
        yield return new(DiagnosticIds.RoutingSkewOutOfRange, "Capacity.RoutingSkew",
            ["RoutingSkew (0.5) must be between 1"],
            C(c => c with { RoutingSkew = 0.5 }), C(c => c with { RoutingSkew = 1 }));
    }
}
