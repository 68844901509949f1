using System;

namespace Moe.Dsl;

/// <summary>Which activations are recomputed in the backward. Mirrors <c>--recompute-granularity</c>.</summary>
public enum RecomputeGranularity
{
    /// <summary>No recompute: every activation the backward needs is kept (Megatron's default, the flag unset).</summary>
    None,

    /// <summary>
    /// <c>selective</c>: the submodules in <see cref="Recompute.Modules"/> keep only their inputs and run again in the
    /// backward, in every layer.
    /// </summary>
    Selective,

    /// <summary>
    /// <c>full</c>: whole decoder layers keep only their input hidden states and run again in the backward; which
    /// layers is set by <see cref="Recompute.Method"/> and <see cref="Recompute.NumLayers"/>.
    /// </summary>
    Full,
}

/// <summary>Which layers full recompute covers. Mirrors <c>--recompute-method</c>.</summary>
public enum RecomputeMethod
{
    /// <summary>
    /// <c>uniform</c>: the stage's layers are cut into chunks of <see cref="Recompute.NumLayers"/>; each chunk keeps
    /// only its input and is recomputed as one unit.
    /// </summary>
    Uniform,

    /// <summary><c>block</c>: the first <see cref="Recompute.NumLayers"/> layers of each stage are recomputed, the rest keep their activations.</summary>
    Block,
}

/// <summary>The submodules selective recompute covers. Mirrors <c>--recompute-modules</c> (a list in Megatron, flags here).</summary>
[Flags]
public enum RecomputeModules
{
    /// <summary>No module (selective recompute then recomputes nothing).</summary>
    None = 0,

    /// <summary>
    /// <c>core_attn</c>: softmax(QKᵀ/√d)·V. Its inputs q, k, v are kept; the attention kernel's own saved state is not.
    /// With a flash/memory-efficient attention kernel this saves little, as Megatron warns.
    /// </summary>
    CoreAttn = 1,

    /// <summary>
    /// <c>moe_act</c>: the experts' SwiGLU activation. Moe's grouped experts always recompute SiLU(g)·u from the kept
    /// gate/up projections in the backward (they never keep it), so this is always on; naming it changes nothing.
    /// </summary>
    MoeAct = 2,

    /// <summary>
    /// <c>layernorm</c>: input_layernorm and pre_mlp_layernorm. Megatron discards the norm's output storage after its
    /// consumer ran (CheckpointWithoutOutput); Moe does not implement that yet and refuses it at start-up (MOE0304).
    /// </summary>
    Layernorm = 4,

    /// <summary><c>mlp</c>: a dense MLP. Mixtral has none (every layer is MoE), so there is nothing to recompute (MOE0304).</summary>
    Mlp = 8,

    /// <summary>
    /// <c>moe</c>: the whole MoE layer — router, permutation, the expert-parallel all-to-all, the experts and the
    /// combine — keeping only its input. The all-to-all runs again in the backward, as in Megatron.
    /// </summary>
    Moe = 16,
}

/// <summary>
/// Activation recompute (activation checkpointing): a recomputed region runs without keeping its intermediate
/// tensors, keeps only its inputs, and runs again with gradients in the backward (Korthikanti et al. 2022,
/// arXiv:2205.05198; Megatron-Core <c>tensor_parallel.checkpoint</c>). Trades compute for memory; gradients are
/// bit-equal to a run without it. The settings mirror Megatron's flags; invalid combinations are rules MOE0302–MOE0304.
/// </summary>
public sealed record Recompute
{
    /// <summary>None, selective or full. Default None. Megatron: <c>--recompute-granularity</c> (unset = none).</summary>
    public RecomputeGranularity Granularity { get; init; } = RecomputeGranularity.None;

    /// <summary>
    /// Uniform or block; required by full recompute, refused with selective (MOE0302, MOE0303). Megatron:
    /// <c>--recompute-method</c>.
    /// </summary>
    public RecomputeMethod? Method { get; init; }

    /// <summary>
    /// Full recompute: with uniform, the layers per recomputed chunk; with block, the layers recomputed per pipeline
    /// stage (per model chunk under a virtual pipeline: each applies the method to its own layers, as Megatron's
    /// TransformerBlock does). Required by full (1 … layers of the largest stage), refused with selective. Megatron:
    /// <c>--recompute-num-layers</c>.
    /// </summary>
    public int? NumLayers { get; init; }

    /// <summary>
    /// The submodules selective recompute covers. Default <see cref="RecomputeModules.CoreAttn"/>, as Megatron's
    /// default <c>["core_attn"]</c>. Ignored by full recompute. Megatron: <c>--recompute-modules</c>.
    /// </summary>
    public RecomputeModules Modules { get; init; } = RecomputeModules.CoreAttn;

    /// <summary>No recompute.</summary>
    public static Recompute Off { get; } = new();

    /// <summary>Full recompute of every layer, one at a time: <c>--recompute-granularity full --recompute-method uniform --recompute-num-layers 1</c>.</summary>
    public static Recompute FullEveryLayer { get; } = new() { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Uniform, NumLayers = 1 };
}
