using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

// Shapes: B batch, S sequence, H hidden, Nq query heads, Nkv key-value heads, d head dim.

/// <summary>
/// Grouped-query self-attention with rotary embeddings (transformers MixtralAttention): q/k/v/o
/// projections without bias, RoPE on q and k (half-split layout), causal scaled-dot-product attention
/// with scale d^-1/2 where query head h reads key-value head h / (Nq/Nkv).
/// </summary>
public sealed class Attention : nn.Module
{
    // q, k and v are one [(Nq + 2·Nkv)·d, H] weight so the projection is one GEMM; the state-dict adapter
    // maps the hub's q_proj/k_proj/v_proj onto its row blocks.
    private readonly Parameter qkv_proj, o_proj;
    private readonly int heads, kvHeads, headDim;

    public Attention(MixtralConfig c, ScalarType dtype, Device device) : base("self_attn")
    {
        heads = c.Heads;
        kvHeads = c.KeyValueHeads;
        headDim = c.HeadDim;
        qkv_proj = new Parameter(torch.empty((long)(heads + 2 * kvHeads) * headDim, c.HiddenSize, dtype: dtype, device: device));
        o_proj = new Parameter(torch.empty(c.HiddenSize, (long)heads * headDim, dtype: dtype, device: device));
        RegisterComponents();
    }

    /// <summary>[(Nq + 2·Nkv)·d, H]: q_proj rows, then k_proj rows, then v_proj rows.</summary>
    public Parameter Qkv => qkv_proj;

    public Parameter O => o_proj;

    /// <summary>Rows of <see cref="Qkv"/> holding q, k and v: (start, count).</summary>
    public (long Start, long Count) QRows => (0, (long)heads * headDim);
    public (long Start, long Count) KRows => ((long)heads * headDim, (long)kvHeads * headDim);
    public (long Start, long Count) VRows => ((long)(heads + kvHeads) * headDim, (long)kvHeads * headDim);

    /// <param name="hiddenBSH">Normalised hidden states.</param>
    /// <param name="rope">cos/sin tables [B or 1, 1, S, d].</param>
    /// <param name="maskB1SS">Boolean attention mask (true = attend) for document-causal attention, or null for plain causal.</param>
    public Tensor Forward(Tensor hiddenBSH, (Tensor Cos, Tensor Sin) rope, Tensor? maskB1SS)
    {
        long b = hiddenBSH.shape[0], s = hiddenBSH.shape[1];
        var projectedBSW = nn.functional.linear(hiddenBSH, qkv_proj);
        // On CUDA in bf16 one kernel rotates q and k inside the fused projection (bit-equal to Rotary.Apply).
        bool fused = RotaryQkv.Applies(projectedBSW, rope.Cos, headDim);
        if (fused) projectedBSW = RotaryQkv.Apply(projectedBSW, rope, heads + kvHeads, headDim);
        var qkv = projectedBSW.split(new[] { QRows.Count, KRows.Count, VRows.Count }, -1);
        var qBNSd = qkv[0].view(b, s, heads, headDim).transpose(1, 2);
        var kBNSd = qkv[1].view(b, s, kvHeads, headDim).transpose(1, 2);
        var vBNSd = qkv[2].view(b, s, kvHeads, headDim).transpose(1, 2);
        if (!fused)
        {
            qBNSd = Rotary.Apply(qBNSd, rope);
            kBNSd = Rotary.Apply(kBNSd, rope);
        }
        var outBNSd = maskB1SS is null
            ? Kernels.CausalAttention(qBNSd, kBNSd, vBNSd)
            : Kernels.MaskedAttention(qBNSd, kBNSd, vBNSd, maskB1SS);
        return nn.functional.linear(outBNSd.transpose(1, 2).reshape(b, s, (long)heads * headDim), o_proj);
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
