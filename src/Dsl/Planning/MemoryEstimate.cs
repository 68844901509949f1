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
/// An estimate for planning, not a measurement; every term and its formula is in docs/memory.md. Activations count
/// what this runtime keeps for the backward (Korthikanti et al. 2022, arXiv:2205.05198, adapted to flash attention,
/// MoE and Moe's grouped experts), per token and layer in elements of the compute dtype: attention
/// 3h + 2·Nq·d + 2·Nkv·d, the MoE layer's input h, and per routed row 3h + 2F/ETP. The rows the most loaded rank's
/// experts receive follow <see cref="Capacity.RoutingSkew"/> when dropless and the exact capacity bound otherwise;
/// <see cref="Recompute"/> replaces recomputed activations by their inputs plus one rerun's working set.
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

    /// <summary>
    /// One layer's backward working set on top of what the forward kept: the gradient of the gate/up projections of
    /// the rank's rows (R · 2F/ETP elements) and the experts' gate/up weight gradient in the compute dtype before it is
    /// added into the main gradients (⌈E/EP⌉ · 2F/ETP · h elements). Measured on the H200, it is what the peak adds to
    /// the forward's activations (docs/memory.md, docs/performance.md).
    /// </summary>
    public double BackwardBytes { get; init; }

    /// <summary>The weight-gradient part of <see cref="BackwardBytes"/> (a run keeping gradients in the compute dtype holds it as the gradient itself).</summary>
    public double BackwardWeightGradientBytes { get; init; }

    /// <summary>CUDA context, NCCL buffers, allocator slack.</summary>
    public double OverheadBytes { get; init; }

    /// <summary>Parameters held by the most loaded rank.</summary>
    public long ParametersPerGpu { get; init; }

    /// <summary>Activations if every expert got exactly its fair share T·k/E (uniform routing), for comparison.</summary>
    public double ActivationsUniformBytes { get; init; }

    /// <summary>Rows the most loaded rank's experts process per layer and micro-batch, at the assumed skew or the capacity bound.</summary>
    public double RoutedRows { get; init; }

    /// <summary>Rows per layer and micro-batch under uniform routing: T·k, with T the rank's tokens at the MoE layer.</summary>
    public double RoutedRowsUniform { get; init; }

    /// <summary>Where <see cref="RoutedRows"/> comes from, e.g. "dropless, most loaded expert at 1.5 × its fair share" or "capacity factor 1.25: exact bound".</summary>
    public string RoutingAssumption { get; init; } = "";

    /// <summary>The sum.</summary>
    public double TotalBytes => WeightsBytes + GradientsBytes + OptimizerBytes + ActivationsBytes + BackwardBytes + OverheadBytes;

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

        var act = Activations(s, layers);
        // One layer's backward at a time: ∂(gate|up) of the rows, and the gate/up weight gradient before it lands.
        double computeBytes = bf16 ? 2 : 4;
        double upWidth = 2.0 * m.IntermediateSize / etp;
        double weightGradient = Math.Ceiling((double)m.Experts / ep) * upWidth * m.HiddenSize * computeBytes;
        return new MemoryEstimate
        {
            ParametersPerGpu = total,
            WeightsBytes = total * weightBytes,
            GradientsBytes = total * gradBytes,
            OptimizerBytes = dense * optimizerPerParam / (dp * cp) + experts * optimizerPerParam / edp,
            ActivationsBytes = act.Bytes,
            BackwardBytes = act.Rows * upWidth * computeBytes + weightGradient,
            BackwardWeightGradientBytes = weightGradient,
            ActivationsUniformBytes = act.UniformBytes,
            RoutedRows = act.Rows,
            RoutedRowsUniform = act.UniformRows,
            RoutingAssumption = act.Assumption,
            OverheadBytes = OverheadGB * 1e9,
        };
    }

    /// <summary>Activation elements per token and layer, and the routed rows of the most loaded rank (docs/memory.md).</summary>
    /// <param name="Attention">3h + 2·Nq·d + 2·Nkv·d: the norm's input and output, q/k/v, the attention output, the residual sum.</param>
    /// <param name="MoeInput">h: the MoE layer's normalised input (kept by the router's GEMM).</param>
    /// <param name="PerRow">3h + 2F/ETP per routed row: the permuted row, the expert output (kept for the combine weight's
    /// gradient) and TorchSharp's same-sized buffer for the grouped experts' output, plus the gate/up projections.</param>
    /// <param name="Checkpoint">2h per recomputed unit: its kept input and TorchSharp's buffer for its output.</param>
    public sealed record ActivationTerms(double Attention, double MoeInput, double PerRow, double Checkpoint);

    /// <summary>The per-token element counts of <paramref name="s"/> (before dividing by sequence or context parallel).</summary>
    public static ActivationTerms Terms(RecipeSettings s)
    {
        var m = s.Model;
        double h = m.HiddenSize, qd = (double)m.AttentionHeads * m.EffectiveHeadDim, kvd = (double)m.KeyValueHeads * m.EffectiveHeadDim;
        double f = (double)m.IntermediateSize / Math.Max(1, s.Parallelism.EffectiveExpertTensor);
        return new ActivationTerms(3 * h + 2 * qd + 2 * kvd, h, 3 * h + 2 * f, 2 * h);
    }

    /// <summary>
    /// Rows the most loaded rank's experts process per layer and micro-batch, for <paramref name="tokens"/> tokens per rank
    /// at the MoE layer: dropless, min(skew·T·k, EP·T·min(k, E/EP)) (every expert of that rank at skew × its fair share,
    /// capped by what the ranks can send: a token reaches a rank at most min(k, E/EP) times); with a capacity factor,
    /// C = ceil(T·k/E·factor) per expert and source rank, so E·min(C, T) rows when padded, and at most
    /// min(E·min(C, T), EP·T·min(k, E/EP)) otherwise.
    /// </summary>
    public static (double Rows, string Assumption) RoutedRowsOf(RecipeSettings s, double tokens, double? skew = null)
    {
        int k = s.TopK, e = s.Model.Experts, ep = Math.Max(1, s.Parallelism.Expert);
        double local = (double)e / ep;
        double reachable = ep * tokens * Math.Min(k, local);
        if (s.Capacity.Factor is double factor)
        {
            double c = Math.Ceiling(tokens * k / e * factor);
            double bound = e * Math.Min(c, tokens);
            return s.Capacity.PadToCapacity
                ? (bound, $"capacity factor {Validation.Arithmetic.F(factor)}, padded: exactly E·min(C, T) rows")
                : (Math.Min(bound, reachable), $"capacity factor {Validation.Arithmetic.F(factor)}: exact bound");
        }
        double x = skew ?? s.Capacity.RoutingSkew;
        return (Math.Min(x * tokens * k, reachable), $"dropless, most loaded expert at {Validation.Arithmetic.F(x)} × its fair share");
    }

    private sealed record ActivationResult(double Bytes, double UniformBytes, double Rows, double UniformRows, string Assumption);

    private static ActivationResult Activations(RecipeSettings s, int layers)
    {
        var p = s.Parallelism;
        var m = s.Model;
        int tp = Math.Max(1, p.Tensor), cp = Math.Max(1, p.Context), pp = Math.Max(1, p.Pipeline);
        double bytes = s.Training.Precision == Precision.Bf16 ? 2 : 4;
        double sp = p.SequenceParallel ? tp : 1;
        // Tokens of one micro-batch on this rank: divided by context parallel, and at the norms and the MoE layer by
        // tensor parallel when sequence parallel splits the sequence.
        double tokens = (double)s.Training.MicroBatchSize * s.Data.SequenceLength / cp / sp;
        var t = Terms(s);
        var (rows, assumption) = RoutedRowsOf(s, tokens);
        double uniformRows = tokens * s.TopK;
        int inFlight = Math.Max(1, Math.Min(pp, Math.Max(1, s.GradientAccumulationSteps)));
        // fp32 log-probabilities of the loss on the last stage, counted for the most loaded rank to stay on the safe side.
        double logits = (double)s.Training.MicroBatchSize * s.Data.SequenceLength / cp * m.VocabSize / tp * 4;
        // Full recompute applies its method to each model chunk of the stage (the virtual pipeline's), as Megatron does.
        int modelChunks = pp > 1 ? Math.Max(1, p.VirtualPipeline ?? 1) : 1;
        double Total(double r) => StageActivations(s.Recompute, layers, tokens, r, t, modelChunks) * bytes * inFlight + logits;
        return new ActivationResult(Total(rows), Total(Math.Min(uniformRows, rows)), rows, uniformRows, assumption);
    }

    /// <summary>
    /// Elements one micro-batch keeps on a stage of <paramref name="layers"/> layers at its peak, with recompute.
    /// Full recompute applies its method to each of the stage's <paramref name="modelChunks"/> model chunks of
    /// c = layers / modelChunks layers (Megatron's TransformerBlock per chunk): uniform n — ⌈c/n⌉ checkpoints per
    /// chunk plus one unit of min(n, c) layers rerun in the backward; block n — min(n, c) checkpoints per chunk plus the
    /// other layers (or one rerun layer when all are recomputed). Selective — core_attn adds its output buffer (flash
    /// attention keeps q, k, v either way), moe keeps the layer's input and output buffer instead of its rows, plus one
    /// layer's rows while it reruns.
    /// </summary>
    public static double StageActivations(Recompute r, int layers, double tokens, double rows, ActivationTerms t, int modelChunks = 1)
    {
        double routed = rows * t.PerRow;
        double layer = tokens * (t.Attention + t.MoeInput) + routed;
        double checkpoint = tokens * t.Checkpoint;
        int v = Math.Max(1, Math.Min(modelChunks, layers));
        int perChunk = (layers + v - 1) / v;
        switch (r.Granularity)
        {
            case RecomputeGranularity.Full when r.Method == RecomputeMethod.Uniform && r.NumLayers is int n && n >= 1:
                int units = v * ((perChunk + n - 1) / n);
                return units * checkpoint + Math.Min(n, perChunk) * layer;
            case RecomputeGranularity.Full when r.Method == RecomputeMethod.Block && r.NumLayers is int b && b >= 1:
                int recomputed = Math.Min(layers, v * Math.Min(b, perChunk));
                return recomputed * checkpoint + Math.Max(layers - recomputed, 1) * layer;
            case RecomputeGranularity.Selective:
                double h = t.Checkpoint / 2;
                double attention = t.Attention + ((r.Modules & RecomputeModules.CoreAttn) != 0 ? h : 0);
                bool moe = (r.Modules & RecomputeModules.Moe) != 0;
                double perLayer = tokens * (attention + t.MoeInput + (moe ? h : 0)) + (moe ? 0 : routed);
                return layers * perLayer + (moe ? routed : 0);
            default:
                return layers * layer;
        }
    }

    private static int[] StageCounts(Parallelism p, int layers) =>
        Validation.RuleSet.StageLayerCounts(p, layers) ?? new[] { (layers + Math.Max(1, p.Pipeline) - 1) / Math.Max(1, p.Pipeline) };
}
