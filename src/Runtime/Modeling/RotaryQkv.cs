using Moe.Runtime.Devices;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

// Shapes: B batch, S sequence, T = B·S, W the fused q/k/v width, G = (r + 2)·d one key-value group's width
// (r query heads, its key head, its value head), d head dim, h = d/2.

/// <summary>
/// RoPE on the fused q/k/v projection in one CUDA kernel each way (bf16): in every key-value group of every
/// row the query heads and the key head are rotated, the value head copied (Megatron's grouped layout, see
/// <see cref="Attention"/>). ATen needs eleven kernels for the same (narrow, negate, cat, two
/// broadcast multiplies and an add for q and for k, and their backward), most of them strided: about
/// 1.3 ms of an 8x7B step on an H200 (docs/performance.md).
/// </summary>
/// <remarks>
/// Same arithmetic and rounding as <see cref="Rotary.Apply"/> differentiated by autograd, so results are
/// bit-equal: forward y_i = bf(bf(x_i·cos_i) + bf(r_i·sin_i)) with r = [−x₂, x₁]; backward, for i &lt; h,
/// ∂x_i = bf(bf(g_i·cos_i) + bf(g_{i+h}·sin_{i+h})) and ∂x_{i+h} = bf(bf(g_{i+h}·cos_{i+h}) − bf(g_i·sin_i)).
/// Off CUDA bf16, or with MOE_FUSED_KERNELS=0, <see cref="Attention"/> uses <see cref="Rotary.Apply"/>.
/// </remarks>
public sealed class RotaryQkv : torch.autograd.SingleTensorFunction<RotaryQkv>
{
    private const string Source = CudaKernels.Bf16Helpers + """
        // One thread per element of qkv [T, W]; cos/sin [tableRows, S, d] (tableRows 1 or B).
        __device__ __forceinline__ long long table_index(long long r, long long c, long long seq, long long d, long long tableRows) {
            long long s = r % seq, b = tableRows == 1 ? 0 : r / seq;
            return (b * seq + s) * d + c % d;
        }

        // Column c is rotated when its place in its group, c % group, is before `rotated` (the r + 1 rotated heads).
        extern "C" __global__ void rope_forward(const u16* __restrict__ x, const u16* __restrict__ cs, const u16* __restrict__ sn,
                                                u16* __restrict__ y, long long rows, long long width, long long group, long long rotated,
                                                long long seq, long long d, long long tableRows) {
            long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
            if (e >= rows * width) return;
            long long r = e / width, c = e - r * width, half = d / 2, i = c % d;
            if (c % group >= rotated) { y[e] = x[e]; return; }
            long long t = table_index(r, c, seq, d, tableRows);
            float v = f32(x[e]);
            float partner = i < half ? -f32(x[e + half]) : f32(x[e - half]);
            y[e] = (u16)bits(bf(v * f32(cs[t])) + bf(partner * f32(sn[t])));
        }

        extern "C" __global__ void rope_backward(const u16* __restrict__ g, const u16* __restrict__ cs, const u16* __restrict__ sn,
                                                 u16* __restrict__ dx, long long rows, long long width, long long group, long long rotated,
                                                 long long seq, long long d, long long tableRows) {
            long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
            if (e >= rows * width) return;
            long long r = e / width, c = e - r * width, half = d / 2, i = c % d;
            if (c % group >= rotated) { dx[e] = g[e]; return; }
            long long t = table_index(r, c, seq, d, tableRows);
            float own = bf(f32(g[e]) * f32(cs[t]));
            dx[e] = i < half
                ? (u16)bits(own + bf(f32(g[e + half]) * f32(sn[t + half])))
                : (u16)bits(own - bf(f32(g[e - half]) * f32(sn[t - half])));
        }
        """;

    private const int Block = 256;

    private static readonly Lazy<CudaKernels?> Compiled = new(() => CudaKernels.LoadOrExplain(Source, "rope.cu", "RoPE uses ATen ops (slower)"));

    public override string Name => nameof(RotaryQkv);

    /// <summary>Whether the kernels take this projection and these tables: bf16 on CUDA, d even, and compiled for the device.</summary>
    public static bool Applies(Tensor qkvBSW, Tensor cos, int headDim) =>
        CudaKernels.Enabled && qkvBSW.device_type == DeviceType.CUDA && qkvBSW.dtype == ScalarType.BFloat16
        && cos.dtype == ScalarType.BFloat16 && headDim % 2 == 0 && Compiled.Value is not null;

    /// <summary>
    /// qkv [B, S, W] in groups of (<paramref name="queryHeadsPerGroup"/> + 2) heads, with the query and key heads of
    /// every group rotated by the cos/sin tables ([B or 1, 1, S, d]) and the value heads unchanged.
    /// </summary>
    public static Tensor Apply(Tensor qkvBSW, (Tensor Cos, Tensor Sin) rope, int queryHeadsPerGroup, int headDim)
    {
        ManagedBackward.BeforeForward();
        return apply(qkvBSW, rope.Cos, rope.Sin, (long)queryHeadsPerGroup, (long)headDim);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (x, cos, sin) = (((Tensor)vars[0]).contiguous(), ((Tensor)vars[1]).contiguous(), ((Tensor)vars[2]).contiguous());
        long r = (long)vars[3], d = (long)vars[4];
        var shape = ((r + 2) * d, (r + 1) * d, d);
        ctx.save_for_backward([cos, sin]);
        ctx.save_data("shape", shape);
        var y = torch.empty_like(x);
        Launch("rope_forward", x, cos, sin, y, shape);
        return y;
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor gradBSW) =>
        ManagedBackward.Run(Name, 5, ctx, gradBSW, (saved, g) =>
        {
            var shape = ((long, long, long))ctx.get_data("shape");
            Devices.MemoryTrace.Mark("attention's backward (RoPE)");
            var dx = ManagedBackward.Keep(torch.empty_like(g));
            Launch("rope_backward", g, saved[0], saved[1], dx, shape);
            return [dx, null!, null!, null!, null!];
        });

    private static void Launch(string kernel, Tensor input, Tensor cos, Tensor sin, Tensor output, (long Group, long Rotated, long D) shape)
    {
        long seq = input.shape[1], width = input.shape[2], rows = input.shape[0] * seq;
        Compiled.Value!.Launch(kernel, rows * width, Block, input, cos, sin, output, rows, width, shape.Group, shape.Rotated, seq, shape.D, cos.shape[0]);
    }
}
