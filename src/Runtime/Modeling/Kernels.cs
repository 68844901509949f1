using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

/// <summary>
/// ATen operators TorchSharp 0.107 does not bind, reached through TorchScript (torch.jit.compile):
/// fused RMSNorm, scaled-dot-product attention with native grouped-query attention (cuDNN's kernel on
/// CUDA in bf16: forward + backward 0.95 ms per 8x7B layer at 4096 tokens against 1.15 for the flash
/// backend, docs/performance.md), grouped GEMMs for the experts and ATen's SiLU derivative. Autograd
/// flows through the attention and RMSNorm functions; the expert functions serve <see cref="MixtureOfExperts.GroupedSwiGlu"/>.
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

def attention_cudnn(q: Tensor, k: Tensor, v: Tensor, log_sumexp: bool) -> Tensor:
    return torch._scaled_dot_product_cudnn_attention(q, k, v, None, log_sumexp, 0.0, True, False)[0]

def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return torch._grouped_mm(a, b, offs)

def silu_backward(grad: Tensor, x: Tensor) -> Tensor:
    return torch.silu_backward(grad, x)
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
            // The backward needs the row log-sum-exp: without it cuDNN's gradients are NaN (bench/gpu/attention_check.py).
            return Unit.Value.invoke<Tensor>("attention_cudnn", q, k, v, torch.is_grad_enabled() && (q.requires_grad || k.requires_grad || v.requires_grad));
        return Unit.Value.invoke<Tensor>("attention", q, k, v);
    }

    /// <summary>Attention with an explicit boolean mask [B, 1, S, S] (true = attend), e.g. document-causal.</summary>
    public static Tensor MaskedAttention(Tensor q, Tensor k, Tensor v, Tensor mask) =>
        Unit.Value.invoke<Tensor>("attention_masked", q, k, v, mask);

    /// <summary>torch._grouped_mm(a, b, offs): one GEMM per group of rows (2-D a, 3-D b) or of the shared dimension (2-D a and b).</summary>
    public static Tensor GroupedMm(Tensor a, Tensor b, Tensor offsetsE) => Unit.Value.invoke<Tensor>("grouped_mm", a, b, offsetsE);

    /// <summary>ATen's SiLU derivative: grad · σ(x) · (1 + x · (1 − σ(x))), computed in fp32 for bf16 inputs.</summary>
    public static Tensor SiluBackward(Tensor grad, Tensor x) => Unit.Value.invoke<Tensor>("silu_backward", grad, x);
}
