using Moe.Dsl;
using Moe.Dsl.Layout;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

// Shapes: B batch, S sequence, H hidden.

/// <summary>
/// The layers one pipeline stage owns, as the wiring assigns them (<see cref="PipelineSplit"/>: Megatron's even
/// split, or --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers, and with a virtual
/// pipeline one contiguous range per model chunk). The first stage's first chunk also runs the embedding, the
/// last stage's last chunk the final norm, the LM head and the loss (Megatron's pre_process / post_process).
/// </summary>
/// <param name="Stage">This stage, 0 … Stages − 1 (the rank's index in its pp group).</param>
/// <param name="Stages">Pipeline-parallel size.</param>
/// <param name="Chunks">The layers of each model chunk, chunk order.</param>
public sealed record PipelineStage(int Stage, int Stages, IReadOnlyList<LayerRange> Chunks)
{
    /// <summary>The whole model on one stage.</summary>
    public static PipelineStage Whole(int layers) => new(0, 1, [new LayerRange(0, layers)]) { LargestStageLayers = layers };

    /// <summary>Stage <paramref name="stage"/> of the layout in <paramref name="p"/> for a model of <paramref name="layers"/> layers.</summary>
    public static PipelineStage Of(Parallelism p, int layers, int stage)
    {
        if (p.Pipeline <= 1) return Whole(layers);
        var counts = PipelineSplit.LayerCounts(layers, p.Pipeline, p.FirstStageLayers, p.LastStageLayers);
        if (counts is null || counts.Any(c => c % (p.VirtualPipeline ?? 1) != 0))
            throw new UserError($"{layers} layers cannot be split over Pipeline = {p.Pipeline} stages (FirstStageLayers {p.FirstStageLayers?.ToString() ?? "unset"}, " +
                $"LastStageLayers {p.LastStageLayers?.ToString() ?? "unset"}, VirtualPipeline {p.VirtualPipeline?.ToString() ?? "unset"}); `moe check` names the rule (MOE0011, MOE0013, MOE0014).");
        return new PipelineStage(stage, p.Pipeline, PipelineSplit.LayersOfStage(stage, layers, p.Pipeline, p.VirtualPipeline, p.FirstStageLayers, p.LastStageLayers))
        {
            LargestStageLayers = counts.Max(),
        };
    }

    private readonly int _largest;

    /// <summary>
    /// The layers of the split's largest stage (this stage's own count when the split is not known): Megatron's
    /// layers per pipeline rank, the bound of <c>--recompute-num-layers</c> (rule MOE0302).
    /// </summary>
    public int LargestStageLayers
    {
        get => _largest > 0 ? _largest : Chunks.Sum(c => c.Count);
        init => _largest = value;
    }

    /// <summary>Model chunks of this stage (the virtual pipeline size, 1 without one).</summary>
    public int ChunkCount => Chunks.Count;

    /// <summary>The model's numbers of this stage's layers, chunk by chunk.</summary>
    public IEnumerable<int> Layers => Chunks.SelectMany(c => Enumerable.Range(c.Start, c.Count));

    /// <summary>Whether this stage holds the token embedding (the first stage).</summary>
    public bool HoldsEmbedding => Stage == 0;

    /// <summary>Whether this stage holds the final norm and the LM head (the last stage).</summary>
    public bool HoldsHead => Stage == Stages - 1;

    /// <summary>Virtual stage of <paramref name="chunk"/> here: chunk·pp + stage (activations flow 0 → pp·chunks − 1).</summary>
    public int VirtualStage(int chunk) => chunk * Stages + Stage;

    /// <summary>Whether <paramref name="chunk"/> starts the model (embedding).</summary>
    public bool IsFirstVirtual(int chunk) => HoldsEmbedding && chunk == 0;

    /// <summary>Whether <paramref name="chunk"/> ends the model (head and loss).</summary>
    public bool IsLastVirtual(int chunk) => HoldsHead && chunk == ChunkCount - 1;

    /// <summary>Indices into the stage's layer list (<see cref="MixtralModel.Layers"/>) of <paramref name="chunk"/>'s layers.</summary>
    public IEnumerable<int> LocalLayersOf(int chunk) => Enumerable.Range(Chunks.Take(chunk).Sum(c => c.Count), Chunks[chunk].Count);
}

/// <summary>
/// Megatron-Core's MoEAuxLossAutoScaler (transformer/moe/moe_utils.py): the identity on a layer's output in the
/// forward; in the backward it passes the output gradient through and gives the attached aux loss the
/// gradient <c>scale</c> (1 / micro-batches). So a layer's load-balancing and z losses reach the gradient on the
/// stage that holds the layer, with no term added to the final loss — which only the last pipeline stage has.
/// </summary>
public sealed class AuxLossScaler : torch.autograd.SingleTensorFunction<AuxLossScaler>
{
    public override string Name => nameof(AuxLossScaler);

    /// <summary><paramref name="xBSH"/> unchanged, with <paramref name="auxLoss"/> (a scalar, coefficients applied) attached for the backward.</summary>
    public static Tensor Apply(Tensor xBSH, Tensor auxLoss, double scale)
    {
        ManagedBackward.BeforeForward();
        return apply(xBSH, auxLoss, scale);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (x, aux) = ((Tensor)vars[0], (Tensor)vars[1]);
        ctx.save_data("scale", (double)vars[2]);
        ctx.save_data("aux", (aux.dtype, aux.device, aux.shape));
        return x.view(x.shape);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor gradBSH)
    {
        double scale = (double)ctx.get_data("scale");
        var (dtype, device, shape) = ((ScalarType, Device, long[]))ctx.get_data("aux");
        var auxGrad = ManagedBackward.Keep(torch.full(shape, scale, dtype: dtype, device: device));
        return [ManagedBackward.Keep(gradBSH), auxGrad, null!];
    }
}
