namespace Moe.Dsl;

/// <summary>Optimisation: batch sizes, learning-rate schedule, AdamW, clipping, precision and seed.</summary>
public sealed record Training
{
    /// <summary>Samples per optimizer step over all data-parallel ranks. Megatron: <c>--global-batch-size</c>.</summary>
    public int GlobalBatchSize { get; init; } = 1;

    /// <summary>Samples per forward/backward on one rank. Megatron: <c>--micro-batch-size</c>.</summary>
    public int MicroBatchSize { get; init; } = 1;

    /// <summary>Optimizer steps. Megatron: <c>--train-iters</c>.</summary>
    public int Steps { get; init; } = 1000;

    /// <summary>Peak learning rate. Megatron: <c>--lr</c>.</summary>
    public double LearningRate { get; init; } = 1e-5;

    /// <summary>Learning rate at the end of decay. Megatron: <c>--min-lr</c>.</summary>
    public double MinLearningRate { get; init; }

    /// <summary>Decay after warm-up. Megatron: <c>--lr-decay-style</c>.</summary>
    public LrSchedule Schedule { get; init; } = LrSchedule.Cosine;

    /// <summary>
    /// Linear warm-up steps from 0 to the peak. Megatron: <c>--lr-warmup-iters</c>. A warm-up longer than
    /// <see cref="Steps"/> is capped at Steps with a note (MOE0213), so a short trial run needs no other change.
    /// </summary>
    public int WarmupSteps { get; init; }

    /// <summary>Decoupled AdamW weight decay. Megatron: <c>--weight-decay</c>.</summary>
    public double WeightDecay { get; init; } = 0.1;

    /// <summary>AdamW β1. Megatron: <c>--adam-beta1</c>.</summary>
    public double AdamBeta1 { get; init; } = 0.9;

    /// <summary>AdamW β2. Megatron: <c>--adam-beta2</c>.</summary>
    public double AdamBeta2 { get; init; } = 0.95;

    /// <summary>AdamW ε. Megatron: <c>--adam-eps</c>.</summary>
    public double AdamEps { get; init; } = 1e-8;

    /// <summary>Global gradient-norm clip; 0 disables clipping. Megatron: <c>--clip-grad</c>.</summary>
    public double ClipGrad { get; init; } = 1.0;

    /// <summary>Random seed for initialisation, data order and dropout. Megatron: <c>--seed</c>.</summary>
    public int Seed { get; init; } = 1234;

    /// <summary>
    /// Evaluate the validation split (the second weight of <see cref="Data.Split"/>) every this many steps and
    /// after the last step; null: never. Default 1000. Megatron: <c>--eval-interval</c>.
    /// </summary>
    public int? EvalInterval { get; init; } = 1000;

    /// <summary>
    /// Global batches of validation samples per evaluation, run in micro-batches of <see cref="MicroBatchSize"/>
    /// without gradients. Default 100. Megatron: <c>--eval-iters</c>.
    /// </summary>
    public int EvalIters { get; init; } = 100;

    /// <summary>Training precision. Megatron: <c>--bf16</c>.</summary>
    public Precision Precision { get; init; } = Precision.Bf16;

    /// <summary>
    /// Shard the fp32 main weights and Adam moments over data parallel (each rank updates its slice, then the
    /// weights are all-gathered), as Megatron-Core's distributed optimizer does; false keeps a full copy on every
    /// rank and all-reduces gradients. Default true, as Megatron's Mixtral examples run. Megatron:
    /// <c>--use-distributed-optimizer</c>.
    /// </summary>
    public bool DistributedOptimizer { get; init; } = true;

    /// <summary>
    /// Overlap the data-parallel gradient reduction with the backward: in each step's last micro-batch, a bucket of
    /// the experts' gradients starts its reduce-scatter (all-reduce without <see cref="DistributedOptimizer"/>) as soon
    /// as the experts' backward has written all of it, on a separate NCCL stream, while the lower layers' backward
    /// runs; the optimizer waits for all. Default false. Megatron: <c>--overlap-grad-reduce</c>. Dense buckets
    /// (attention, norms, router, embeddings) are still reduced after the backward, as are buckets behind one that is
    /// not ready (a layer on the per-expert loop path); the losses and parameters are those of the setting off.
    /// Under pipeline parallel a bucket starts in the last backward of the step that gives its parameters their
    /// gradient (with a virtual pipeline, each model chunk's own last backward). The expert data-parallel group is
    /// not overlapped where it shares its communicator with a group the backward uses (tensor, context or expert
    /// parallel over the same ranks, e.g. TP 2 with ETP 1 on two GPUs); the trainer says so at start-up.
    /// </summary>
    public bool OverlapGradReduce { get; init; }

    /// <summary>
    /// How long any collective may wait for the other ranks before the job is aborted with a report naming the
    /// group, the operation and the ranks that never arrived (the environment variable
    /// <c>MOE_DISTRIBUTED_TIMEOUT_SECONDS</c> overrides it). Megatron: <c>--distributed-timeout-minutes</c> (default 10).
    /// </summary>
    public double DistributedTimeoutMinutes { get; init; } = 10;
}
