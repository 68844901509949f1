using Moe.Runtime.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shape legend
//   R  rows sorted by expert   H  hidden size   I  expert FFN width   E  experts

/// <summary>
/// The grouped SwiGLU experts as one autograd node, so the backward keeps only the rows [R, H] and the
/// gate/up projections [R, 2I]. Differentiating the three ATen calls instead keeps also SiLU(g) and
/// SiLU(g)·u ([R, I] each, 235 MB per layer for Mixtral-8x7B at 4096 tokens); here the product is
/// recomputed in the backward from what is kept (docs/performance.md). On CUDA in bf16 the element-wise
/// SwiGLU work runs in <see cref="SwiGluKernels"/>; elsewhere in ATen ops with the same results.
/// </summary>
/// <remarks>
/// <para>
/// The weight gradients are accumulated into <c>gate_up.grad</c> and <c>down.grad</c> by the backward
/// itself and not handed to autograd: TorchSharp keeps a handle on every tensor a managed backward returns,
/// so autograd's accumulator would see a second owner and copy the gradient (1.9 GB per layer for 8x7B).
/// Megatron-Core's gradient-accumulation fusion writes into <c>main_grad</c> the same way. The consequence:
/// <c>torch.autograd.grad</c> with respect to expert weights returns nothing; <c>backward()</c> fills
/// <c>.grad</c> as usual (summing when it is already set).
/// </para>
/// <para>
/// The row gradient is handed to autograd through <see cref="ManagedBackward"/>, so the engine frees the
/// buffer once the dispatcher's backward has used it; a failure in the backward is reported by
/// <see cref="ManagedBackward.Complete"/>.
/// </para>
/// </remarks>
public sealed class GroupedSwiGlu : torch.autograd.SingleTensorFunction<GroupedSwiGlu>
{
    public override string Name => nameof(GroupedSwiGlu);

    /// <summary>Expert_e(row) for rows sorted by expert; offsets are the cumulative row counts (int32 [E]).</summary>
    /// <param name="rowsRH">Rows sorted by expert.</param>
    /// <param name="gateUpE2IH">gate_up weights.</param>
    /// <param name="downEHI">down weights.</param>
    /// <param name="offsetsE">Cumulative row counts.</param>
    /// <param name="sinks">fp32 main gradients to accumulate the weight gradients into, or null for <c>.grad</c>.</param>
    public static Tensor Apply(Tensor rowsRH, Tensor gateUpE2IH, Tensor downEHI, Tensor offsetsE, ExpertGradientSinks? sinks = null)
    {
        ManagedBackward.BeforeForward();
        return apply(rowsRH, gateUpE2IH, downEHI, offsetsE, sinks ?? ExpertGradientSinks.None);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (rows, gateUp, down, offsets) = ((Tensor)vars[0], (Tensor)vars[1], (Tensor)vars[2], (Tensor)vars[3]);
        var gu = Kernels.GroupedMm(rows, gateUp.transpose(1, 2), offsets);
        long ffn = down.shape[2];
        using var act = SwiGluKernels.Applies(rows, ffn)
            ? SwiGluKernels.Forward(gu)
            : nn.functional.silu(gu.narrow(-1, 0, ffn)) * gu.narrow(-1, ffn, ffn);
        var outRH = Kernels.GroupedMm(act, down.transpose(1, 2), offsets);
        ctx.save_for_backward([rows, gu, gateUp, down, offsets]);
        ctx.save_data("sinks", vars[4]);
        return outRH;
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor gradOutRH) =>
        ManagedBackward.Run(Name, 5, ctx, gradOutRH, (saved, dOut) =>
        {
            var (rows, gu, gateUp, down, offsets) = (saved[0], saved[1], saved[2], saved[3], saved[4]);
            var sinks = (ExpertGradientSinks)ctx.get_data("sinks");
            Devices.MemoryTrace.Mark("experts' backward");
            // Our handles are now the only references to what the forward saved, so each saved tensor, and each
            // intermediate, goes as soon as it has been used: ∂act, gu (0.9 GiB for 8x7B at 8192 tokens), act, the rows, ∂gu.
            ManagedBackward.ReleaseSaved(ctx);
            var dAct = Kernels.GroupedMm(dOut, down, offsets);
            var (dGu, act) = SwiGluKernels.Applies(rows, down.shape[2]) ? SwiGluKernels.Backward(dAct, gu) : SwiGluBackward(dAct, gu);
            dAct.Dispose();
            gu.Dispose();
            Accumulate(down, Kernels.GroupedMm(dOut.t(), act, offsets), sinks.Down);
            act.Dispose();
            Accumulate(gateUp, Kernels.GroupedMm(dGu.t(), rows, offsets), sinks.GateUp);
            rows.Dispose();
            var dRows = ManagedBackward.Keep(Kernels.GroupedMm(dGu, gateUp, offsets));
            dGu.Dispose();
            Devices.MemoryTrace.Mark("experts' backward done");
            return [dRows, null!, null!, null!, null!];
        });

    /// <summary>
    /// The SwiGLU backward in ATen ops, as autograd differentiates SiLU(g)·u (the path off bf16 CUDA, and the
    /// reference the fused kernel is compared with): (∂gu = [∂g | ∂u], act).
    /// </summary>
    private static (Tensor DGateUp, Tensor Act) SwiGluBackward(Tensor dActRI, Tensor guR2I)
    {
        long ffn = guR2I.shape[1] / 2;
        var g = guR2I.narrow(-1, 0, ffn);
        var u = guR2I.narrow(-1, ffn, ffn);
        var s = nn.functional.silu(g);
        var dg = Kernels.SiluBackward(dActRI * u, g);
        return (torch.cat([dg, dActRI * s], -1), s * u);
    }

    /// <summary>
    /// Into the main gradient when a sink is given; else weight.grad += g, or weight.grad = g when unset (the tensor is
    /// then owned by the weight). g's handle is released.
    /// </summary>
    private static void Accumulate(Tensor weight, Tensor g, GradientSink? sink)
    {
        if (sink is not null && weight.requires_grad)
        {
            sink.Accumulate(g);
            g.Dispose();
            return;
        }
        if (weight.requires_grad)
        {
            using var existing = weight.grad;
            if (existing is null) weight.grad = g;
            else existing.add_(g);
        }
        g.Dispose();
    }
}
