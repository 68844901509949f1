using System;
using System.Linq;

namespace Moe.Dsl.Planning;

/// <summary>
/// Per-GPU memory of the most loaded rank, in bytes, estimated from the recipe:
/// weights, gradients and optimizer state (Megatron's distributed optimizer, which shards fp32
/// master weights and Adam moments over the data-parallel group — expert parameters over the
/// expert data-parallel group), activations of the micro-batches in flight, and a fixed
/// allowance for the CUDA context, NCCL buffers and allocator fragmentation.
/// </summary>
/// <remarks>
/// An estimate for planning, not a measurement: activations follow Korthikanti et al. 2022
/// ("Reducing Activation Recomputation in Large Transformer Models") with flash attention and no
/// recomputation, adapted to MoE: per layer and token, attention keeps about
/// (10·h + 4·kv·d) bytes (bf16), the MoE block 2·h plus, per routed slot (top-k), 2·h + 6·F bytes;
/// everything is divided by Tensor under sequence parallel and by Context.
/// </remarks>
public sealed record MemoryEstimate
{
    /// <summary>Model weights in the compute dtype.</summary>
    public double WeightsBytes { get; init; }

    /// <summary>Gradients (fp32 main gradients under bf16, as Megatron keeps them).</summary>
    public double GradientsBytes { get; init; }

    /// <summary>fp32 master weights and Adam moments, sharded over data parallel.</summary>
    public double OptimizerBytes { get; init; }

    /// <summary>Activations of the micro-batches in flight on the most loaded stage.</summary>
    public double ActivationsBytes { get; init; }

    /// <summary>CUDA context, NCCL buffers, allocator slack.</summary>
    public double OverheadBytes { get; init; }

    /// <summary>Parameters held by the most loaded rank.</summary>
    public long ParametersPerGpu { get; init; }

    /// <summary>The sum.</summary>
    public double TotalBytes => WeightsBytes + GradientsBytes + OptimizerBytes + ActivationsBytes + OverheadBytes;

    /// <summary>Whether the total fits in <paramref name="gpu"/>'s memory.</summary>
    public bool FitsOn(GpuSpec gpu) => TotalBytes <= gpu.MemoryGB * 1e9;

    private const double OverheadGB = 4.0;

    /// <summary>
    /// Whether the layout is whole enough to estimate: positive sizes, whole data-parallel and expert
    /// data-parallel sizes, whole experts per rank, a pipeline split, whole gradient accumulation.
    /// (When it is not, the topology and data rules say why.)
    /// </summary>
    public static bool CanEstimate(RecipeSettings s)
    {
        var p = s.Parallelism;
        return p.Gpus >= 1 && p.Tensor >= 1 && p.Pipeline >= 1 && p.Context >= 1 && p.Expert >= 1 && p.EffectiveExpertTensor >= 1
            && p.DataParallel > 0 && p.ExpertDataParallel > 0 && s.Model.Experts % p.Expert == 0
            && s.Model.Layers >= 1 && Validation.RuleSet.StageLayerCounts(p, s.Model.Layers) is not null
            && s.Training.MicroBatchSize >= 1 && s.GradientAccumulationSteps > 0 && s.Data.SequenceLength >= 1;
    }

    /// <summary>Estimates the most loaded rank of a valid recipe (findings are the rule set's job).</summary>
    public static MemoryEstimate For(RecipeSettings s)
    {
        var m = s.Model;
        var p = s.Parallelism;
        int tp = Math.Max(1, p.Tensor), pp = Math.Max(1, p.Pipeline), cp = Math.Max(1, p.Context);
        int ep = Math.Max(1, p.Expert), etp = Math.Max(1, p.EffectiveExpertTensor);
        int dp = Math.Max(1, p.DataParallel), edp = Math.Max(1, p.ExpertDataParallel);
        int[] stages = StageCounts(p, m.Layers);
        int layers = stages.Max();

        // Parameters on the most loaded rank: its stage's layers, plus embedding (first stage) or LM head (last stage).
        long densePerLayer = (m.AttentionParameters + m.NormParameters) / tp + m.RouterParameters;
        long expertPerLayer = (long)Math.Ceiling((double)m.Experts / ep) * m.ExpertParameters / etp;
        long embed = (long)m.VocabSize * m.HiddenSize / tp;
        long dense = densePerLayer * layers + embed * (pp == 1 ? (m.TieWordEmbeddings ? 1 : 2) : 1) + m.HiddenSize;
        long experts = expertPerLayer * layers;
        long total = dense + experts;

        bool bf16 = s.Training.Precision == Precision.Bf16;
        double weightBytes = bf16 ? 2 : 4;
        double gradBytes = 4;
        // fp32 master copy (bf16 only) + Adam m and v, sharded by the distributed optimizer.
        double optimizerPerParam = (bf16 ? 4 : 0) + 8;

        long tokens = (long)s.Training.MicroBatchSize * s.Data.SequenceLength;
        double spDivisor = p.SequenceParallel ? tp : 1;
        double h = m.HiddenSize, kvd = (double)m.KeyValueHeads * m.EffectiveHeadDim, f = m.IntermediateSize;
        double actBytes = bf16 ? 1 : 2; // the formula counts bf16 bytes; fp32 doubles it
        double attention = (10 * h + 4 * kvd) / spDivisor;
        double moe = 2 * h / spDivisor + s.TopK * (2 * h + 6 * f / etp) / spDivisor;
        double perLayer = tokens * (attention + moe) * actBytes / cp;
        int inFlight = Math.Max(1, Math.Min(pp, Math.Max(1, s.GradientAccumulationSteps)));
        // fp32 logits for the loss on the last stage; counted for the most loaded rank to stay on the safe side.
        double logits = (double)tokens / cp * m.VocabSize / tp * 4;

        return new MemoryEstimate
        {
            ParametersPerGpu = total,
            WeightsBytes = total * weightBytes,
            GradientsBytes = total * gradBytes,
            OptimizerBytes = dense * optimizerPerParam / (dp * cp) + experts * optimizerPerParam / edp,
            ActivationsBytes = perLayer * layers * inFlight + logits,
            OverheadBytes = OverheadGB * 1e9,
        };
    }

    private static int[] StageCounts(Parallelism p, int layers) =>
        Validation.RuleSet.StageLayerCounts(p, layers) ?? new[] { (layers + Math.Max(1, p.Pipeline) - 1) / Math.Max(1, p.Pipeline) };
}
