using Moe.Runtime.Devices;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shape legend
//   T  tokens (B·S, batch-major)   H  hidden size   I  expert FFN width
//   E  experts                     K  router top-k  R  rows sent to the experts (T·K when dropless)

/// <summary>What one MoE layer did with a micro-batch: its output, and what losses and metrics need.</summary>
/// <param name="HiddenTH">The layer's output, Σ_k w_tk · Expert_{e_tk}(h_t), in the hidden dtype.</param>
/// <param name="Routing">Router logits, aux scores, combine weights and chosen experts.</param>
/// <param name="Dispatch">Rows per expert, capacity drops and the permutation.</param>
public sealed record MoeLayerOutput(Tensor HiddenTH, Routing Routing, Dispatch Dispatch)
{
    /// <summary>(token, expert) pairs routed to each expert, before capacity (int64 [E]).</summary>
    public Tensor RoutedPerExpert => Dispatch.RoutedPerExpertE;

    /// <summary>(token, expert) pairs each expert processed, after capacity, without padding (int64 [E]).</summary>
    public Tensor TokensPerExpert => Dispatch.KeptPerExpertE;

    /// <summary>Fraction of routed pairs dropped by capacity (fp32 scalar; 0 when dropless).</summary>
    public Tensor DropRate => Dispatch.DropRate;

    /// <summary>Every tensor the record holds (to move them out of a dispose scope together).</summary>
    public IEnumerable<Tensor> Tensors() =>
    [
        HiddenTH, Routing.LogitsTE, Routing.ScoresTE, Routing.WeightsTK, Routing.ExpertsTK, Routing.AuxExpertsTK,
        Dispatch.RowsRH, Dispatch.TokenOfRowR, Dispatch.WeightOfRowR, Dispatch.RowsPerExpertE, Dispatch.RoutedPerExpertE, Dispatch.KeptPerExpertE,
    ];
}

/// <summary>
/// The groups a router sums its load-balancing counts over (Megatron's <c>tp_cp_group</c> and <c>tp_dp_cp_group</c> in
/// router.py): the ranks that hold parts of the same sequences — tensor parallel under sequence parallel, context
/// parallel — and, for the global aux loss, those ranks over data parallel too.
/// </summary>
/// <param name="TensorContext">Tensor × context parallel (aux_loss, seq_aux_loss).</param>
/// <param name="TensorDataContext">Tensor × data × context parallel (global_aux_loss).</param>
public sealed record LoadBalancingGroups(Distributed.Communicator TensorContext, Distributed.Communicator TensorDataContext);

/// <summary>
/// A sparse MoE block (Shazeer et al. 2017, "Outrageously Large Neural Networks", arXiv:1701.06538; Mixtral:
/// Jiang et al. 2024, arXiv:2401.04088): router → dispatch (capacity, permutation) → grouped SwiGLU experts →
/// weighted combine, <c>y_t = Σ_{k&lt;K} w_tk · Expert_{e_tk}(h_t)</c>.
/// </summary>
/// <remarks>
/// <para>
/// Laid out like Megatron-Core's <c>transformer/moe/</c>: <see cref="TopKRouter"/> (router.py), the
/// dispatcher's local phases in <see cref="LocalTokenDispatcher"/> (token_dispatcher.py; an expert-parallel
/// all-to-all goes between its permute and unpermute), <see cref="Experts"/> (experts.py) and the loss
/// functions in <see cref="AuxLosses"/> (moe_utils.py). Hub parameter names stay with the state-dict adapter.
/// </para>
/// <para>
/// The default <see cref="MoeOptions"/> reproduce transformers' Mixtral exactly (fp32 softmax over all experts,
/// top-k, renormalised, dropless); recipe options switch on Megatron's capacity factor, drop policies,
/// pad-to-capacity, sigmoid scores, pre-softmax, group-limited routing, the router dtype, the aux-loss-free
/// expert bias and the Megatron aux-loss variants (<see cref="MegatronAuxLoss"/>). Per-expert token counts
/// and the drop rate are computed on every forward and returned in <see cref="MoeLayerOutput"/>.
/// </para>
/// </remarks>
public sealed class MoeLayer : nn.Module
{
    private readonly Parameter gate;
    private readonly Experts experts;
    private readonly GlobalAuxLossTracker globalTracker;
    private readonly ExpertBias? expertBias;
    private MoeOptions options;

    /// <param name="numExperts">E, all experts of the layer (the router scores every one).</param>
    /// <param name="hidden">H.</param>
    /// <param name="ffn">Each expert's FFN width (before any expert tensor-parallel split).</param>
    /// <param name="options">Routing, capacity and loss semantics.</param>
    /// <param name="dtype">Parameter dtype.</param>
    /// <param name="device">Parameter device.</param>
    /// <param name="dispatcher">Where the experts live: all here (null), or the expert-parallel dispatcher of this rank's experts.</param>
    public MoeLayer(int numExperts, int hidden, int ffn, MoeOptions options, ScalarType dtype, Device device, IExpertDispatcher? dispatcher = null) : base("mlp")
    {
        this.options = Checked(options, numExperts);
        NumExperts = numExperts;
        Dispatcher = dispatcher ?? new LocalExpertDispatcher(numExperts);
        var placement = Dispatcher.Placement;
        if (placement.TotalExperts != numExperts || ffn % placement.TensorSize != 0)
            throw new ArgumentException($"Expert placement {placement} does not fit {numExperts} experts of FFN width {ffn}.");
        gate = new Parameter(torch.empty(numExperts, hidden, dtype: dtype, device: device));
        experts = new Experts(placement.LocalExperts, hidden, ffn / placement.TensorSize, dtype, device);
        RegisterComponents();
        // Not registered components: the running counts are run state, not weights (Megatron keeps them in
        // non-persistent buffers); the expert bias is saved by the checkpoint adapter under its hub name.
        globalTracker = new GlobalAuxLossTracker(numExperts, device);
        expertBias = options.ExpertBias ? new ExpertBias(numExperts, device) : null;
    }

    /// <summary>Routing, capacity and loss settings; whether an expert bias exists is fixed at construction.</summary>
    public MoeOptions Options
    {
        get => options;
        set
        {
            if (value.ExpertBias != options.ExpertBias)
                throw new ArgumentException("MoeOptions.ExpertBias cannot change after the layer is built (the bias is layer state).", nameof(value));
            options = Checked(value, NumExperts);
        }
    }

    /// <summary>How rows reach this rank's experts (<see cref="LocalExpertDispatcher"/> when every expert is here).</summary>
    public IExpertDispatcher Dispatcher { get; }

    public int NumExperts { get; }

    /// <summary>Router weight W_gate [E, H] (hub: block_sparse_moe.gate.weight).</summary>
    public Parameter Gate => gate;

    /// <summary>This rank's experts' grouped weights (all experts on one device).</summary>
    public Experts ExpertWeights => experts;

    /// <summary>Running routed counts for the global aux loss; reset once per global batch.</summary>
    public GlobalAuxLossTracker GlobalAuxLoss => globalTracker;

    /// <summary>The aux-loss-free expert bias and its counts (<see cref="MoeOptions.ExpertBias"/>), or null when off.</summary>
    public ExpertBias? ExpertBias => expertBias;

    /// <summary>
    /// Where the load-balancing counts are summed (Megatron's router tp_cp and tp_dp_cp groups), set by the parallel
    /// plan; null on one device, where every group has one member.
    /// </summary>
    public LoadBalancingGroups? LoadBalancingGroups { get; set; }

    /// <param name="hiddenTH">Normalised hidden states of the micro-batch, flattened batch-major.</param>
    /// <param name="sequences">
    /// B, the sequences the T tokens belong to (S = T / B each). The position drop policy keeps the earliest
    /// pairs in Megatron's token order, which is sequence-major ([S, B]); see <see cref="LocalTokenDispatcher"/>.
    /// </param>
    public MoeLayerOutput Forward(Tensor hiddenTH, int sequences = 1)
    {
        var routing = TopKRouter.Route(hiddenTH, gate, Options, expertBias?.BiasE);
        HostTrace.Mark("router");
        var dispatch = LocalTokenDispatcher.Permute(hiddenTH, routing, NumExperts, Options, sequences);
        // Megatron counts the router's final routing map (after capacity, padding slots included), only with
        // gradients enabled: evaluation and recomputation leave the bias update alone.
        if (expertBias is not null && torch.is_grad_enabled()) expertBias.Accumulate(dispatch.RowsPerExpertE);
        HostTrace.Mark("permute");
        var (rowsQH, rowsPerLocalExpert, context) = Dispatcher.Dispatch(dispatch.RowsRH, dispatch.RowsPerExpertE);
        var outputsRH = Dispatcher.Combine(experts.Forward(rowsQH, rowsPerLocalExpert), context);
        HostTrace.Mark("experts");
        var output = new MoeLayerOutput(LocalTokenDispatcher.Unpermute(outputsRH, dispatch, hiddenTH.shape[0]), routing, dispatch);
        HostTrace.Mark("unpermute");
        return output;
    }

    /// <summary>
    /// This layer's Megatron load-balancing loss before its coefficient (router.py <c>_apply_aux_loss</c>,
    /// <c>_apply_seq_aux_loss</c>, <c>_apply_global_aux_loss</c>), from the aux scores and their own plain top-k
    /// (<see cref="Routing.AuxExpertsTK"/>, before capacity). The global variant adds this micro-batch's counts
    /// to the running ones only in training with gradients enabled, as Megatron does; otherwise it is reported
    /// against this micro-batch's counts. Zero (a scalar) with <see cref="Dsl.LoadBalancing.None"/>.
    /// </summary>
    /// <remarks>
    /// With <see cref="LoadBalancingGroups"/> the counts are summed over the ranks that share the sequences
    /// (aux_loss and seq_aux_loss: tensor × context parallel; global_aux_loss: tensor × data × context parallel) and
    /// the token count is this rank's times the group's size (Megatron's get_tokens_per_expert_and_token_count):
    /// the result is this rank's share, and the shares of the group add up to the loss of the whole sequences.
    /// Collective over that group: every member calls it for every layer in the same order.
    /// </remarks>
    /// <param name="output">What <see cref="Forward"/> returned.</param>
    /// <param name="sequences">B (for seq_aux_loss: each of the B sequences of S = T / B tokens on its own).</param>
    public Tensor MegatronAuxLoss(MoeLayerOutput output, int sequences)
    {
        var r = output.Routing;
        int k = options.TopK;
        if (options.LoadBalancing == Dsl.LoadBalancing.None) return torch.zeros(1, device: r.ScoresTE.device).squeeze();
        long tokens = r.ScoresTE.shape[0];
        var groups = LoadBalancingGroups;
        if (options.LoadBalancing == Dsl.LoadBalancing.SeqAuxLoss)
        {
            var countsBE = Summed(AuxLosses.CountsPerSequence(r.AuxExpertsTK, sequences, NumExperts), groups?.TensorContext);
            return AuxLosses.Sequence(r.ScoresTE, countsBE, sequences, k, tokens / sequences * (groups?.TensorContext.Size ?? 1));
        }
        var countsE = LocalTokenDispatcher.CountPerExpert(r.AuxExpertsTK.flatten(), NumExperts);
        if (options.LoadBalancing == Dsl.LoadBalancing.GlobalAuxLoss)
        {
            countsE = Summed(countsE, groups?.TensorDataContext);
            long total = tokens * (groups?.TensorDataContext.Size ?? 1);
            return AuxLosses.Global(r.ScoresTE, training && torch.is_grad_enabled() ? globalTracker.Accumulate(countsE) : countsE.to(ScalarType.Float32), k, total);
        }
        return AuxLosses.Switch(r.ScoresTE, Summed(countsE, groups?.TensorContext), k, tokens * (groups?.TensorContext.Size ?? 1));
    }

    /// <summary>Integer counts summed over <paramref name="group"/> (a copy; no gradient flows through counts).</summary>
    private static Tensor Summed(Tensor counts, Distributed.Communicator? group)
    {
        if (group is null || group.Size == 1) return counts;
        var sum = counts.contiguous().clone();
        group.AllReduce(sum);
        return sum;
    }

    /// <summary>
    /// Moves the expert bias by the pairs counted since the last call (<see cref="ExpertBias.Update"/>) and zeroes
    /// the counts; a layer not in training only zeroes them (Megatron updates routers in training mode only).
    /// Does nothing without <see cref="MoeOptions.ExpertBias"/>.
    /// </summary>
    public void UpdateExpertBias()
    {
        if (expertBias is null) return;
        if (training) expertBias.Update(options.BiasUpdateRate);
        else expertBias.ResetCounts();
    }

    private static MoeOptions Checked(MoeOptions o, int experts)
    {
        if (o.GroupTopK is int gk && (o.NumGroups is not int g || g < 1 || experts % g != 0 || gk < 1 || gk > g))
            throw new ArgumentException($"Group-limited routing needs NumGroups dividing the {experts} experts and 1 ≤ GroupTopK ≤ NumGroups (got NumGroups {o.NumGroups?.ToString() ?? "unset"}, GroupTopK {gk}; rule MOE0104).");
        if (o.ExpertBias && o.ScoreFunction != Dsl.ScoreFunction.Sigmoid)
            throw new ArgumentException("The expert bias needs sigmoid scores (rule MOE0111).");
        return o;
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            globalTracker.Dispose();
            expertBias?.Dispose();
        }
        base.Dispose(disposing);
    }
}
