using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

/// <summary>
/// ATen operators TorchSharp 0.107 does not bind, reached through TorchScript (torch.jit.compile):
/// fused RMSNorm, scaled-dot-product attention with native grouped-query attention (cuDNN's kernel on
/// CUDA, 3× faster than the flash backend on an H200: docs/performance.md), and grouped GEMMs for the
/// experts. Autograd flows through every function.
/// </summary>
public static class Kernels
{
    private static readonly Lazy<torch.jit.CompilationUnit> Unit = new(() => torch.jit.compile(Source));

    private const string Source = @"
def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return torch.rms_norm(x, [x.size(-1)], w, eps)

def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.scaled_dot_product_attention(q, k, v, None, 0.0, True, enable_gqa=True)

def attention_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return torch.scaled_dot_product_attention(q, k, v, mask, 0.0, False, enable_gqa=True)

def attention_cudnn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True, False)[0]

def swiglu_grouped(x: Tensor, gate_up: Tensor, down: Tensor, offs: Tensor) -> Tensor:
    gu = torch._grouped_mm(x, gate_up.transpose(1, 2), offs)
    g, u = gu.chunk(2, dim=-1)
    return torch._grouped_mm(torch.silu(g) * u, down.transpose(1, 2), offs)
";

    /// <summary>y = w ⊙ cast(x_f32 · rsqrt(mean(x_f32²) + eps)) — transformers' MixtralRMSNorm, fused.</summary>
    public static Tensor RmsNorm(Tensor x, Tensor weight, double eps)
    {
        if (x.dtype == ScalarType.Float32 || x.device_type != DeviceType.CUDA)
        {
            // transformers normalises in fp32, casts back, then multiplies by the weight; the fused
            // kernel multiplies before the cast, which differs in bf16, so keep the exact order off the GPU
            // fast path and in fp32 (where both orders agree).
            var xf = x.to(ScalarType.Float32);
            var normed = xf * torch.rsqrt(xf.pow(2).mean([-1], keepdim: true) + eps);
            return weight * normed.to(x.dtype);
        }
        return Unit.Value.invoke<Tensor>("rms_norm", x, weight, eps);
    }

    /// <summary>Causal attention, q [B, H, S, d], k/v [B, Hkv, S, d] (query head h uses KV head h / (H/Hkv)).</summary>
    public static Tensor CausalAttention(Tensor q, Tensor k, Tensor v)
    {
        if (q.device_type == DeviceType.CUDA && q.dtype == ScalarType.BFloat16)
            return Unit.Value.invoke<Tensor>("attention_cudnn", q, k, v);
        return Unit.Value.invoke<Tensor>("attention", q, k, v);
    }

    /// <summary>Attention with an explicit boolean mask [B, 1, S, S] (true = attend), e.g. document-causal.</summary>
    public static Tensor MaskedAttention(Tensor q, Tensor k, Tensor v, Tensor mask) =>
        Unit.Value.invoke<Tensor>("attention_masked", q, k, v, mask);

    /// <summary>
    /// SwiGLU experts over rows sorted by expert: rows [offs[e-1], offs[e]) go through expert e.
    /// gateUp [E, 2I, H] (rows 0..I-1 = w1, the gate; I..2I-1 = w3, the up projection), down [E, H, I].
    /// </summary>
    public static Tensor SwigluGrouped(Tensor rowsRH, Tensor gateUp, Tensor down, Tensor offsetsE) =>
        Unit.Value.invoke<Tensor>("swiglu_grouped", rowsRH, gateUp, down, offsetsE);
}
