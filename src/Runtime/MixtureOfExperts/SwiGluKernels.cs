using Moe.Runtime.Devices;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shape legend
//   R  rows sorted by expert   I  expert FFN width   gu = [g | u], the gate and up projections [R, 2I]

/// <summary>
/// The SwiGLU element-wise work of the experts as two CUDA kernels (bf16, 8 values per thread): forward
/// act = SiLU(g)·u, and a backward that makes ∂g, ∂u and the recomputed act in one pass over ∂act and gu.
/// ATen needs two kernels forward and five backward for the same, three of them strided (docs/performance.md).
/// </summary>
/// <remarks>
/// The arithmetic is ATen's, rounding included, so results are bit-equal to the ATen path that transformers
/// also runs: SiLU in fp32 (x / (1 + e^−x)) rounded to bf16; every product of two bf16 values formed in fp32
/// and rounded; ∂g = SiLU′ applied as ATen's silu_backward does (dy·σ·(1 + x·(1 − σ)) in fp32) to the
/// rounded ∂act·u. Set MOE_FUSED_KERNELS=0 to use the ATen ops instead (the two are compared on the GPU by
/// bench/gpu/checks.sh).
/// </remarks>
public static class SwiGluKernels
{
    private const string Source = CudaKernels.Bf16Helpers + """
        __device__ __forceinline__ float act1(float x, float u) { return bf(x / (1.0f + expf(-x))) * u; }
        __device__ __forceinline__ void grad1(float x, float u, float d, float* dg, float* du, float* a) {
            float s = bf(x / (1.0f + expf(-x)));
            *a = s * u;
            *du = d * s;
            float t = bf(d * u);
            float sig = 1.0f / (1.0f + expf(-x));
            *dg = t * sig * (1.0f + x * (1.0f - sig));
        }

        // act[r, :] = SiLU(gu[r, :I]) * gu[r, I:]; one thread per 8 columns; h = I / 8.
        extern "C" __global__ void swiglu_forward(const V8* __restrict__ gu, V8* __restrict__ act, long long rows, long long h) {
            long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x;
            if (v >= rows * h) return;
            long long r = v / h, c = v - r * h;
            V8 g = gu[2 * r * h + c], u = gu[2 * r * h + h + c], o;
            #pragma unroll
            for (int k = 0; k < 4; k++)
                o.w[k] = pack(act1(lo(g.w[k]), lo(u.w[k])), act1(hi(g.w[k]), hi(u.w[k])));
            act[v] = o;
        }

        // From dact [R, I] and gu: dgu = [dg | du] and act (for the down projection's weight gradient).
        extern "C" __global__ void swiglu_backward(const V8* __restrict__ dact, const V8* __restrict__ gu, V8* __restrict__ dgu,
                                                   V8* __restrict__ act, long long rows, long long h) {
            long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x;
            if (v >= rows * h) return;
            long long r = v / h, c = v - r * h;
            V8 d = dact[v], g = gu[2 * r * h + c], u = gu[2 * r * h + h + c], dg, du, a;
            #pragma unroll
            for (int k = 0; k < 4; k++) {
                float dg0, du0, a0, dg1, du1, a1;
                grad1(lo(g.w[k]), lo(u.w[k]), lo(d.w[k]), &dg0, &du0, &a0);
                grad1(hi(g.w[k]), hi(u.w[k]), hi(d.w[k]), &dg1, &du1, &a1);
                dg.w[k] = pack(dg0, dg1);
                du.w[k] = pack(du0, du1);
                a.w[k] = pack(a0, a1);
            }
            dgu[2 * r * h + c] = dg;
            dgu[2 * r * h + h + c] = du;
            act[v] = a;
        }
        """;

    private const int Block = 256;

    private static readonly Lazy<CudaKernels?> Compiled = new(() => CudaKernels.LoadOrExplain(Source, "swiglu.cu", "the experts use ATen ops (slower)"));

    /// <summary>Whether the kernels take rows like these: bf16 on CUDA, I a multiple of 8, and compiled for the device.</summary>
    public static bool Applies(Tensor rows, long ffn) =>
        CudaKernels.Enabled && rows.device_type == DeviceType.CUDA && rows.dtype == ScalarType.BFloat16 && ffn % 8 == 0 && Compiled.Value is not null;

    /// <summary>act = SiLU(g)·u, [R, I].</summary>
    public static Tensor Forward(Tensor guR2I)
    {
        long rows = guR2I.shape[0], ffn = guR2I.shape[1] / 2;
        var act = torch.empty(rows, ffn, dtype: guR2I.dtype, device: guR2I.device);
        Compiled.Value!.Launch("swiglu_forward", rows * (ffn / 8), Block, guR2I, act, rows, ffn / 8);
        return act;
    }

    /// <summary>(∂gu [R, 2I], act [R, I]) from ∂act [R, I] and gu.</summary>
    public static (Tensor DGateUp, Tensor Act) Backward(Tensor dActRI, Tensor guR2I)
    {
        long rows = guR2I.shape[0], ffn = guR2I.shape[1] / 2;
        if (!dActRI.is_contiguous()) dActRI = dActRI.contiguous();
        var dgu = torch.empty_like(guR2I);
        var act = torch.empty(rows, ffn, dtype: guR2I.dtype, device: guR2I.device);
        Compiled.Value!.Launch("swiglu_backward", rows * (ffn / 8), Block, dActRI, guR2I, dgu, act, rows, ffn / 8);
        return (dgu, act);
    }
}
