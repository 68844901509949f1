using System;

namespace Moe.Dsl;

/// <summary>
/// Training health: the five signals the Megatron-Core Mixtral fine-tuning tutorial (Step 5) asks users to
/// watch — loss, token-drop rate, per-expert token counts, device memory, expert-parallel all-to-all time —
/// checked live against these bounds, and where the run shows them (TensorBoard). When a signal leaves its
/// range the run prints one warning naming the signal, its value, the setting to change and in which
/// direction, records it in the metrics, and warns again only after the signal has come back in range.
/// A bound set to null switches its check off. Megatron prints these numbers (<c>--log-throughput</c>,
/// <c>--moe-per-layer-logging</c>) but checks none of them.
/// </summary>
public sealed record Health
{
    /// <summary>
    /// Steps averaged before the drop rate, expert load and all-to-all share are compared with their bounds
    /// (fewer at the start of a run), so one noisy step neither starts nor ends an episode. Default 20. Moe only.
    /// </summary>
    public int Window { get; init; } = 20;

    /// <summary>
    /// Loss check: the mean language-model loss of the last this-many steps must be below the mean of the
    /// this-many steps before them. Default 100: the tutorial expects the loss to fall over steps 1–200.
    /// Null switches the check off. Moe only.
    /// </summary>
    public int? LossWindow { get; init; } = 100;

    /// <summary>
    /// Highest acceptable token-drop rate (dropped / routed token-expert assignments, averaged over
    /// <see cref="Window"/>). Default 0.01. The tutorial asks for "low and stable" drops and says to raise the
    /// capacity factor gradually when they persist. Megatron logs it as <c>moe_token_drop_rate</c>. Null: off.
    /// </summary>
    public double? MaxDropRate { get; init; } = 0.01;

    /// <summary>
    /// Highest acceptable expert load imbalance in any layer: the busiest expert's routed assignments over the
    /// layer's mean per expert (1 is perfectly uniform; top-k of E experts cannot exceed E / k). Default 1.5.
    /// The tutorial asks for "near-uniform" counts and says to raise the aux-loss or z-loss coefficient. Null: off.
    /// </summary>
    public double? MaxLoadImbalance { get; init; } = 1.5;

    /// <summary>
    /// Router-collapse bound: the share of a layer's routed assignments taken by its TopK busiest experts
    /// (uniform routing gives TopK / Experts; full collapse gives 1). Default 0.9. The tutorial's failure
    /// "router imbalance divergence": a small subset of experts receives most tokens. Null: off.
    /// </summary>
    public double? CollapseShare { get; init; } = 0.9;

    /// <summary>
    /// Smallest acceptable share of device memory left free after a step (checked when the device reports
    /// its memory: CUDA). Default 0.10. The tutorial: reserve HBM headroom, since routing spikes after step 1
    /// can still run out of memory; remedies in its order — capacity factor, then padding, then micro-batch
    /// size, never the global batch first. Null: off.
    /// </summary>
    public double? MinMemoryHeadroom { get; init; } = 0.10;

    /// <summary>
    /// Highest acceptable share of the step spent in the expert-parallel all-to-all (checked when the runtime
    /// measures it: Expert &gt; 1). Default 0.5. The tutorial: EP all-to-all time must not dominate the step. Null: off.
    /// </summary>
    public double? MaxAllToAllShare { get; init; } = 0.5;

    /// <summary>
    /// Signals that stop the run when they leave their range: the step's metrics are written, a checkpoint is
    /// saved when <see cref="Checkpoint.Save"/> is set, and the run exits with code 3 naming the signal.
    /// Default: none (every signal only warns). Moe only.
    /// </summary>
    public HealthSignal StopOn { get; init; } = HealthSignal.None;

    /// <summary>
    /// Directory for TensorBoard event files; relative to the run directory when not rooted. Default
    /// "tensorboard" (inside the run directory). Megatron: <c>--tensorboard-dir</c>.
    /// </summary>
    public string TensorBoardDir { get; init; } = "tensorboard";
}

/// <summary>The health signals of <see cref="Health"/>, combinable for <see cref="Health.StopOn"/>.</summary>
[Flags]
public enum HealthSignal
{
    /// <summary>No signal.</summary>
    None = 0,

    /// <summary>The loss is not decreasing (<see cref="Health.LossWindow"/>).</summary>
    Loss = 1,

    /// <summary>The token-drop rate is above <see cref="Health.MaxDropRate"/>.</summary>
    DropRate = 2,

    /// <summary>An expert's load is above <see cref="Health.MaxLoadImbalance"/> times its layer's mean.</summary>
    LoadImbalance = 4,

    /// <summary>The TopK busiest experts of a layer take more than <see cref="Health.CollapseShare"/> of its tokens.</summary>
    RouterCollapse = 8,

    /// <summary>Free device memory is below <see cref="Health.MinMemoryHeadroom"/>.</summary>
    MemoryHeadroom = 16,

    /// <summary>The expert-parallel all-to-all takes more than <see cref="Health.MaxAllToAllShare"/> of the step.</summary>
    AllToAll = 32,
}
