using Moe.Runtime.Modeling;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shapes: R rows (routed token-expert pairs, sorted by expert), H hidden, I expert FFN width, E experts.

/// <summary>
/// The SwiGLU experts of one layer, stored grouped as transformers 5 fuses them:
/// gate_up [E, 2I, H] (rows 0..I-1 are w1, the gate; rows I..2I-1 are w3, the up projection) and
/// down [E, H, I] (w2). Expert_e(x) = W2_e · (SiLU(W1_e·x) ⊙ W3_e·x).
/// </summary>
/// <remarks>
/// Rows are computed by expert with grouped GEMMs (torch._grouped_mm through TorchScript: 561 TFLOP/s on
/// an H200 against 247 for a per-expert loop, docs/performance.md) where the kernel runs — CPU, and CUDA in
/// bf16 on sm90+ — and by a per-expert loop otherwise (fp32 on CUDA). Both are tested equal.
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

    public Tensor Forward(Tensor rowsRH, Tensor rowsPerExpertE)
    {
        if (!ForceLoop && GroupedGemmRuns(rowsRH))
            return Kernels.SwigluGrouped(rowsRH, gate_up, down, rowsPerExpertE.cumsum(0).to(ScalarType.Int32));
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

    private static bool GroupedGemmRuns(Tensor rows) =>
        rows.device_type == DeviceType.CPU || rows.dtype == ScalarType.BFloat16;
}
