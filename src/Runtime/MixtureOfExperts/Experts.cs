using Moe.Runtime.Modeling;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shape legend
//   R  rows (kept token-expert pairs plus padding, sorted by expert)   H  hidden size
//   I  expert FFN width (intermediate_size)                            E  experts

/// <summary>
/// The SwiGLU experts of one layer, stored grouped as transformers 5 fuses them:
/// gate_up [E, 2I, H] (rows 0..I-1 are w1, the gate; rows I..2I-1 are w3, the up projection) and
/// down [E, H, I] (w2). Expert_e(x) = W2_e · (SiLU(W1_e·x) ⊙ W3_e·x).
/// </summary>
/// <remarks>
/// Rows are computed by expert with grouped GEMMs (torch._grouped_mm through TorchScript: 561 TFLOP/s on
/// an H200 against 247 for a per-expert loop, docs/performance.md) where the kernel runs — CPU, and CUDA in
/// bf16 on sm90+ — as one autograd node (<see cref="GroupedSwiGlu"/>), and by a per-expert loop otherwise
/// (fp32 on CUDA). Both are tested equal, gradients included.
/// </remarks>
public sealed class Experts : nn.Module
{
    private readonly Parameter gate_up;
    private readonly Parameter down;

    public Experts(int experts, int hidden, int ffn, ScalarType dtype, Device device) : base("experts")
    {
        gate_up = new Parameter(torch.empty(experts, 2L * ffn, hidden, dtype: dtype, device: device));
        down = new Parameter(torch.empty(experts, hidden, ffn, dtype: dtype, device: device));
        RegisterComponents();
    }

    /// <summary>[E, 2I, H]: w1 rows then w3 rows per expert.</summary>
    public Parameter GateUp => gate_up;

    /// <summary>[E, H, I]: w2 per expert.</summary>
    public Parameter Down => down;

    /// <summary>Forces the per-expert loop (for tests and devices without grouped GEMMs).</summary>
    public bool ForceLoop { get; set; }

    /// <summary>
    /// fp32 main gradients the grouped backward accumulates into directly (gate_up, down), or null to accumulate into
    /// <c>.grad</c>. The trainer's gradient buffer sets them for bf16 training.
    /// </summary>
    public ExpertGradientSinks Sinks { get; set; } = ExpertGradientSinks.None;

    /// <summary>
    /// Whether <see cref="Forward"/> takes the grouped-GEMM path for rows of this dtype and device:
    /// not forced to loop; CPU, or CUDA in bf16; and every matrix row a multiple of 16 bytes
    /// (torch._grouped_mm's stride rule: H·elementSize and I·elementSize divisible by 16; Mixtral's
    /// 4096/14336 and 6144/16384 always are, toy sizes may not be).
    /// </summary>
    public bool UsesGroupedGemm(Tensor rowsRH)
    {
        if (ForceLoop || !(rowsRH.device_type == DeviceType.CPU || rowsRH.dtype == ScalarType.BFloat16)) return false;
        long elementSize = rowsRH.ElementSize;
        return down.shape[1] * elementSize % 16 == 0 && down.shape[2] * elementSize % 16 == 0;
    }

    /// <param name="rowsRH">Rows sorted by expert: the first rowsPerExpert[0] belong to expert 0, and so on.</param>
    /// <param name="rowsPerExpertE">Rows per expert (int64 [E], summing to R; zeros allowed).</param>
    /// <returns>Expert_e(row) for every row, [R, H], in the rows' order.</returns>
    public Tensor Forward(Tensor rowsRH, Tensor rowsPerExpertE)
    {
        if (UsesGroupedGemm(rowsRH))
            return GroupedSwiGlu.Apply(rowsRH, gate_up, down, rowsPerExpertE.cumsum(0).to(ScalarType.Int32), Sinks);
        return Loop(rowsRH, rowsPerExpertE);
    }

    private Tensor Loop(Tensor rowsRH, Tensor rowsPerExpertE)
    {
        long[] counts = rowsPerExpertE.cpu().data<long>().ToArray();
        var chunks = rowsRH.split(counts);
        var outputs = new Tensor[counts.Length];
        long ffn = down.shape[2];
        for (int e = 0; e < counts.Length; e++)
        {
            var gu = chunks[e].matmul(gate_up[e].t());
            var act = nn.functional.silu(gu.narrow(-1, 0, ffn)) * gu.narrow(-1, ffn, ffn);
            outputs[e] = act.matmul(down[e].t());
        }
        return torch.cat(outputs);
    }
}
