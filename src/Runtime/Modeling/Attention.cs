using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

// Shapes: B batch, S sequence, H hidden, Nq query heads, Nkv key-value heads (groups), d head dim,
// r = query heads per group on this rank (Nq/Nkv; Nq/TP when key-value heads are replicated), g key-value groups on
// this rank (Nkv / TP, or 1 when TP > Nkv).

/// <summary>
/// Grouped-query self-attention with rotary embeddings (transformers MixtralAttention): q/k/v/o
/// projections without bias, RoPE on q and k (half-split layout), causal scaled-dot-product attention
/// with scale d^-1/2 where query head h reads key-value head h / r.
/// </summary>
/// <remarks>
/// <para>
/// q, k and v are one weight in Megatron-Core's grouped layout (linear_qkv, shared/spec/megatron-formats.md §4.3):
/// group k holds the r query heads k·r … k·r + r − 1, then key head k, then value head k — [Nkv, r + 2, d, H] —
/// so the projection is one GEMM and a tensor-parallel rank's share (whole groups) is one contiguous block of
/// rows. The state-dict adapter maps the hub's q_proj/k_proj/v_proj onto it.
/// </para>
/// <para>
/// Under tensor parallelism (Megatron's ColumnParallelLinear / RowParallelLinear) this rank holds g = Nkv/TP
/// groups of the q/k/v projection and the matching Nq/TP·d input columns of the output projection; its output is
/// a partial sum the caller reduces over the tensor-parallel group.
/// </para>
/// <para>
/// With fewer key-value heads than tensor ranks (TP a multiple of Nkv, Megatron rule R017) each rank holds one group:
/// its Nq/TP query heads — the contiguous block of rank t, all of which read key-value head t / (TP/Nkv) — and a copy
/// of that group's key and value heads, so its local weight is [1, Nq/TP + 2, d, H] in the same grouped layout. The
/// TP/Nkv ranks of a group hold identical replicas of its k/v rows (Megatron's attention.py replicates them the same
/// way); the trainer sums their gradients over those ranks (<see cref="TensorParallel.KeyValueReplicas"/>).
/// </para>
/// </remarks>
public sealed class Attention : nn.Module
{
    private readonly Parameter qkv_proj, o_proj;
    private readonly int groups, perGroup, headDim;

    /// <param name="c">The config.</param>
    /// <param name="dtype">Parameter dtype.</param>
    /// <param name="device">Parameter device.</param>
    /// <param name="tensorParallel">Tensor-parallel size: this rank holds Nkv / it groups, or one (replicated) group when it exceeds Nkv.</param>
    public Attention(MixtralConfig c, ScalarType dtype, Device device, int tensorParallel = 1) : base("self_attn")
    {
        if (c.Heads % c.KeyValueHeads != 0)
            throw new UserError($"num_attention_heads ({c.Heads}) must be a multiple of num_key_value_heads ({c.KeyValueHeads}).");
        int tp = tensorParallel;
        TensorParallel.CheckHeads(c, tp);
        bool replicated = tp > c.KeyValueHeads;
        groups = replicated ? 1 : c.KeyValueHeads / tp;
        perGroup = replicated ? c.Heads / tp : c.Heads / c.KeyValueHeads;
        headDim = c.HeadDim;
        qkv_proj = new Parameter(torch.empty((long)groups * (perGroup + 2) * headDim, c.HiddenSize, dtype: dtype, device: device));
        o_proj = new Parameter(torch.empty(c.HiddenSize, (long)groups * perGroup * headDim, dtype: dtype, device: device));
        RegisterComponents();
    }

    /// <summary>[g·(r + 2)·d, H]: per group, its r query heads' rows, its key head's, its value head's.</summary>
    public Parameter Qkv => qkv_proj;

    /// <summary>[H, g·r·d]: the output projection's columns for this rank's query heads.</summary>
    public Parameter O => o_proj;

    /// <summary>Key-value groups on this rank (g).</summary>
    public int Groups => groups;

    /// <summary>Query heads per group on this rank (r: Nq/Nkv, or Nq/TP when key-value heads are replicated).</summary>
    public int QueryHeadsPerGroup => perGroup;

    /// <summary>Head dimension (d).</summary>
    public int HeadDim => headDim;

    /// <summary>
    /// Context parallel (set by <see cref="ContextParallel.Apply"/>): the keys and values of the whole sequence are
    /// all-gathered over the cp group after RoPE, and the queries of this rank's tokens attend to them under the
    /// model's mask. Null or size 1: this rank's tokens are the whole sequence.
    /// </summary>
    public ContextParallel? Context { get; set; }

    /// <summary>Selective recompute of the core attention (Megatron <c>core_attn</c>): keep q, k, v and rerun it in the backward.</summary>
    public bool RecomputeCore { get; set; }

    /// <summary>softmax(QKᵀ/√d)·V, causal or under the boolean mask.</summary>
    private static Tensor Core(Tensor qBNSd, Tensor kBNSd, Tensor vBNSd, Tensor? maskB1SS) => maskB1SS is null
        ? Kernels.CausalAttention(qBNSd, kBNSd, vBNSd)
        : Kernels.MaskedAttention(qBNSd, kBNSd, vBNSd, maskB1SS);

    /// <summary>The fused weight as [g, r + 2, d, H] (a view): [:, :r] the query heads, [:, r] the keys, [:, r + 1] the values.</summary>
    public Tensor GroupedView(Tensor qkvWeight) => qkvWeight.view(groups, perGroup + 2, headDim, qkvWeight.shape[^1]);

    /// <param name="hiddenBSH">Normalised hidden states (the whole sequence; under context parallel this rank's Sl tokens).</param>
    /// <param name="rope">cos/sin tables [B or 1, 1, S, d].</param>
    /// <param name="maskB1SS">
    /// Boolean attention mask (true = attend) for document-causal attention, or null for plain causal; under context
    /// parallel [B or 1, 1, Sl, S] over the gathered keys, never null (<see cref="ContextParallel.AttentionMask"/>).
    /// </param>
    /// <returns>This rank's part of the output projection [B, S, H] (the whole output when there is no tensor parallelism).</returns>
    public Tensor Forward(Tensor hiddenBSH, (Tensor Cos, Tensor Sin) rope, Tensor? maskB1SS)
    {
        long b = hiddenBSH.shape[0], s = hiddenBSH.shape[1];
        var projectedBSW = nn.functional.linear(hiddenBSH, qkv_proj);
        // On CUDA in bf16 one kernel rotates q and k inside the fused projection (bit-equal to Rotary.Apply).
        bool fused = RotaryQkv.Applies(projectedBSW, rope.Cos, headDim);
        if (fused) projectedBSW = RotaryQkv.Apply(projectedBSW, rope, perGroup, headDim);
        var grouped = projectedBSW.view(b, s, groups, perGroup + 2, headDim);
        var qBNSd = grouped.narrow(3, 0, perGroup).reshape(b, s, (long)groups * perGroup, headDim).transpose(1, 2);
        var kBNSd = grouped.select(3, perGroup).transpose(1, 2);
        var vBNSd = grouped.select(3, perGroup + 1).transpose(1, 2);
        if (!fused)
        {
            qBNSd = Rotary.Apply(qBNSd, rope);
            kBNSd = Rotary.Apply(kBNSd, rope);
        }
        if (Context is { Size: > 1 } cp) (kBNSd, vBNSd) = cp.GatherKeysValues(kBNSd, vBNSd);
        var outBNSd = RecomputeCore
            ? ActivationRecompute.CoreAttention(Core, qBNSd, kBNSd, vBNSd, maskB1SS)
            : Core(qBNSd, kBNSd, vBNSd, maskB1SS);
        return nn.functional.linear(outBNSd.transpose(1, 2).reshape(b, s, (long)groups * perGroup * headDim), o_proj);
    }
}

/// <summary>
/// Rotary position embedding, default rope_type (transformers MixtralRotaryEmbedding): inv_freq_i =
/// θ^(-2i/d) in fp32, angle = position · inv_freq duplicated to [angles, angles], and
/// x' = x·cos + rotate_half(x)·sin with rotate_half([x1, x2]) = [−x2, x1].
/// </summary>
public static class Rotary
{
    /// <summary>cos/sin [B, 1, S, d] in <paramref name="dtype"/> for position ids [B, S].</summary>
    public static (Tensor Cos, Tensor Sin) Tables(Tensor positionIdsBS, int headDim, double theta, ScalarType dtype)
    {
        var invFreq = 1.0 / torch.pow(theta, torch.arange(0, headDim, 2, dtype: ScalarType.Int64, device: positionIdsBS.device).to(ScalarType.Float32) / headDim);
        var anglesBSh = positionIdsBS.to(ScalarType.Float32).unsqueeze(-1) * invFreq;
        var embBSd = torch.cat(new[] { anglesBSh, anglesBSh }, -1);
        return (embBSd.cos().to(dtype).unsqueeze(1), embBSd.sin().to(dtype).unsqueeze(1));
    }

    public static Tensor Apply(Tensor xBNSd, (Tensor Cos, Tensor Sin) rope)
    {
        long half = xBNSd.shape[3] / 2;
        var rotated = torch.cat(new[] { -xBNSd.narrow(-1, half, half), xBNSd.narrow(-1, 0, half) }, -1);
        return xBNSd * rope.Cos + rotated * rope.Sin;
    }
}
