using Moe.Dsl;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shape legend
//   T  tokens (B·S, batch-major)   H  hidden size   E  experts   K  router top-k
//   G  expert groups (NumGroups)   z  router logits [T, E]        p  scores [T, E]
//   w  combine weights [T, K]

/// <summary>What the router decided for a batch of tokens.</summary>
/// <param name="LogitsTE">Router logits z = W_gate·h in the router dtype (<see cref="MoeOptions.RouterDtype"/>, else the model dtype; what transformers returns as router_logits).</param>
/// <param name="ScoresTE">Per-expert scores over all experts in fp32, each row summing to one (softmax, or sigmoid normalised), used by the aux losses.</param>
/// <param name="WeightsTK">Combine weights of the K chosen experts, in the logits' dtype (Megatron casts its probs to the logits' type).</param>
/// <param name="ExpertsTK">Chosen expert ids (int64), in descending selection-score order.</param>
public sealed record Routing(Tensor LogitsTE, Tensor ScoresTE, Tensor WeightsTK, Tensor ExpertsTK)
{
    /// <summary>
    /// The top-k of <see cref="ScoresTE"/> alone, when it differs from the routing decision (group-limited
    /// routing or an expert bias select otherwise); null when it is <see cref="ExpertsTK"/>.
    /// </summary>
    public Tensor? AuxExpertsOverrideTK { get; init; }

    /// <summary>
    /// The (token, expert) choices the load-balancing losses count: Megatron's
    /// <c>compute_routing_scores_for_aux_loss</c> takes a plain top-k of the aux scores, without group
    /// limits or expert bias, before capacity.
    /// </summary>
    public Tensor AuxExpertsTK => AuxExpertsOverrideTK ?? ExpertsTK;
}

/// <summary>
/// Top-k token-choice router (Shazeer et al. 2017, arXiv:1701.06538; Megatron
/// <c>router.TopKRouter</c> and <c>moe_utils.topk_routing_with_score_function</c>; transformers
/// <c>MixtralTopKRouter</c>), computed as Megatron-Core 0.20 computes it:
/// <list type="number">
/// <item>Gating (<c>router_gating_linear</c>): z_t = W_gate · h_t with input and weight cast to the router dtype
/// (<c>--moe-router-dtype</c> fp32/fp64), else in the model dtype.</item>
/// <item>softmax, post-softmax (the default; Mixtral): top-k of the <b>logits</b>, then w = softmax over the k
/// selected logits in fp32 (equal to renormalising the full softmax over the k, as transformers does: the
/// normaliser cancels).</item>
/// <item>softmax, pre-softmax (<c>--moe-router-pre-softmax</c>): p_t = softmax(z_t) in fp32 over all E, top-k of
/// p, w = p without renormalisation.</item>
/// <item>sigmoid (<c>--moe-router-score-function sigmoid</c>; DeepSeek-V3, arXiv:2412.19437): s = σ(z) in fp32;
/// selection by top-k of s + b (the expert bias, <c>--moe-router-enable-expert-bias</c>, when on), weights from
/// s alone: w = s_k / (Σ_k s_k + 1e-20) when K &gt; 1, else s.</item>
/// <item>Group-limited routing (<c>--moe-router-num-groups</c>, <c>--moe-router-group-topk</c>;
/// <see cref="GroupLimitedTopK"/>) replaces each top-k above, on the same tensor (logits, softmax or biased
/// sigmoid scores).</item>
/// <item>The weights are cast to the logits' dtype (Megatron <c>probs.type_as(logits)</c>).</item>
/// </list>
/// Megatron rule R066 (shared/spec/megatron-rules.md). Top-k ties follow torch.topk. The aux losses use their
/// own scores (<see cref="Routing.ScoresTE"/>) and their own plain top-k (<see cref="Routing.AuxExpertsTK"/>).
/// </summary>
public static class TopKRouter
{
    /// <param name="hiddenTH">Normalised hidden states, tokens batch-major.</param>
    /// <param name="gateWeightEH">W_gate.</param>
    /// <param name="options">Routing settings.</param>
    /// <param name="expertBiasE">The aux-loss-free expert bias (fp32 [E]) added to sigmoid scores for selection only; null when off.</param>
    public static Routing Route(Tensor hiddenTH, Tensor gateWeightEH, MoeOptions options, Tensor? expertBiasE = null)
    {
        var routerDtype = options.RouterDtype switch
        {
            Dsl.RouterDtype.Fp32 => ScalarType.Float32,
            Dsl.RouterDtype.Fp64 => ScalarType.Float64,
            _ => hiddenTH.dtype,
        };
        var logitsTE = hiddenTH.dtype == routerDtype && gateWeightEH.dtype == routerDtype
            ? nn.functional.linear(hiddenTH, gateWeightEH)
            : nn.functional.linear(hiddenTH.to(routerDtype), gateWeightEH.to(routerDtype));
        int k = options.TopK;
        Tensor weightsTK, expertsTK, auxScoresTE;
        bool ownAuxTopK = options.GroupTopK is not null;
        if (options.ScoreFunction == ScoreFunction.Sigmoid)
        {
            var scoresTE = logitsTE.to(ScalarType.Float32).sigmoid();
            var selectTE = expertBiasE is null ? scoresTE : scoresTE + expertBiasE.to(scoresTE.device);
            ownAuxTopK |= expertBiasE is not null;
            (_, expertsTK) = TopK(selectTE, options);
            var topTK = scoresTE.gather(1, expertsTK);
            weightsTK = k > 1 ? topTK / (topTK.sum(-1, keepdim: true) + 1e-20) : topTK;
            // Aux scores: the sigmoid scores normalised to sum to one per token (compute_routing_scores_for_aux_loss).
            auxScoresTE = scoresTE / (scoresTE.sum(-1, keepdim: true) + 1e-20);
        }
        else if (options.PreSoftmax)
        {
            auxScoresTE = logitsTE.to(ScalarType.Float32).softmax(-1);
            (weightsTK, expertsTK) = TopK(auxScoresTE, options);
        }
        else
        {
            var (topLogitsTK, ids) = TopK(logitsTE, options);
            expertsTK = ids;
            weightsTK = topLogitsTK.to(ScalarType.Float32).softmax(-1);
            auxScoresTE = logitsTE.to(ScalarType.Float32).softmax(-1);
        }
        weightsTK = weightsTK.to(logitsTE.dtype);
        return new Routing(logitsTE, auxScoresTE, weightsTK, expertsTK)
        {
            AuxExpertsOverrideTK = ownAuxTopK ? auxScoresTE.topk(k, dim: -1).indexes : null,
        };
    }

    private static (Tensor Values, Tensor Indices) TopK(Tensor scoresTE, MoeOptions options)
    {
        if (options.GroupTopK is int groupTopK)
        {
            int groups = options.NumGroups ?? throw new ArgumentException("GroupTopK needs NumGroups (Moe rule MOE0104).", nameof(options));
            return GroupLimitedTopK(scoresTE, options.TopK, groups, groupTopK);
        }
        var (values, indices) = scoresTE.topk(options.TopK, dim: -1);
        return (values, indices);
    }

    /// <summary>
    /// Group-limited top-k (Megatron <c>moe_utils.group_limited_topk</c>; DeepSeek-V2 device-limited routing,
    /// arXiv:2405.04434, and DeepSeek-V3 node-limited routing, arXiv:2412.19437): the E experts form G
    /// contiguous groups of E/G; each group is scored by the sum of its top K / GroupTopK scores; the
    /// GroupTopK best groups are kept and the K experts are the top-k of the scores with every expert of the
    /// other groups masked to −∞. Rule MOE0105 (R070) guarantees the kept groups hold at least K experts.
    /// </summary>
    /// <param name="scoresTE">What the plain top-k would rank: logits (softmax after top-k), softmax probabilities (pre-softmax) or sigmoid scores plus bias.</param>
    /// <param name="topK">K.</param>
    /// <param name="numGroups">G; divides E.</param>
    /// <param name="groupTopK">Groups kept per token, 1 ≤ GroupTopK ≤ G.</param>
    /// <returns>The K selected scores (values of <paramref name="scoresTE"/>) and their expert ids.</returns>
    public static (Tensor Values, Tensor Indices) GroupLimitedTopK(Tensor scoresTE, int topK, int numGroups, int groupTopK)
    {
        long tokens = scoresTE.shape[0], experts = scoresTE.shape[1];
        if (numGroups < 1 || experts % numGroups != 0)
            throw new ArgumentException($"NumGroups ({numGroups}) must divide the {experts} experts (Moe rule MOE0104).", nameof(numGroups));
        long perGroup = experts / numGroups;
        var groupScoresTG = scoresTE.view(tokens, numGroups, perGroup).topk(topK / groupTopK, dim: -1).values.sum(-1);
        var keptGroupsTG = groupScoresTG.topk(groupTopK, dim: -1, sorted: false).indexes;
        var groupMaskTG = torch.zeros(tokens, numGroups, dtype: ScalarType.Bool, device: scoresTE.device)
            .scatter_(1, keptGroupsTG, torch.ones_like(keptGroupsTG, dtype: ScalarType.Bool));
        var expertMaskTE = groupMaskTG.unsqueeze(-1).expand(tokens, numGroups, perGroup).reshape(tokens, experts);
        var (values, indices) = scoresTE.masked_fill(expertMaskTE.logical_not(), double.NegativeInfinity).topk(topK, dim: -1);
        return (values, indices);
    }
}

/// <summary>
/// The aux-loss-free load-balancing state of one layer (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
/// Strategy for Mixture-of-Experts", arXiv:2408.15664; DeepSeek-V3; Megatron <c>--moe-router-enable-expert-bias</c>):
/// a per-expert bias b, not learned, added to the sigmoid scores when choosing experts and never to the combine
/// weights, and the routed (token, expert) pairs counted since the last update.
/// </summary>
/// <remarks>
/// Megatron keeps both in fp32 (router buffers <c>expert_bias</c>, persistent, and <c>local_tokens_per_expert</c>).
/// The counts are those after capacity, padding slots included (the router's final routing map,
/// <c>_apply_expert_bias</c>), added only while gradients are enabled (not in evaluation). Once per global batch
/// (<c>finalize_model_grads._update_router_expert_bias</c>, via <c>get_updated_expert_bias</c>):
/// <c>b_e += rate · sign(mean_e' c_e' − c_e)</c>, then the counts are zeroed. With data parallelism Megatron sums
/// the counts over the tensor × data × context parallel group first; a distributed trainer must all-reduce
/// <see cref="CountsE"/> before <see cref="Update"/>.
/// </remarks>
public sealed class ExpertBias : IDisposable
{
    private readonly Tensor biasE;
    private readonly Tensor countsE;

    public ExpertBias(int experts, Device device)
    {
        biasE = torch.zeros(experts, dtype: ScalarType.Float32, device: device).DetachFromDisposeScope();
        countsE = torch.zeros(experts, dtype: ScalarType.Float32, device: device).DetachFromDisposeScope();
    }

    /// <summary>The bias b (fp32 [E]); checkpoints save and load it in place.</summary>
    public Tensor BiasE => biasE;

    /// <summary>Pairs routed to each expert since the last <see cref="Update"/> (fp32 [E]).</summary>
    public Tensor CountsE => countsE;

    /// <summary>Adds one micro-batch's routed pairs per expert (after capacity, padding included).</summary>
    public void Accumulate(Tensor rowsPerExpertE)
    {
        using (torch.no_grad()) countsE.add_(rowsPerExpertE.to(ScalarType.Float32).to(countsE.device));
    }

    /// <summary><c>b += rate · sign(mean(c) − c)</c>, then c = 0 (Megatron <c>get_updated_expert_bias</c>).</summary>
    public void Update(double rate)
    {
        using var scope = torch.NewDisposeScope();
        using (torch.no_grad())
        {
            biasE.add_((countsE.mean() - countsE).sign().mul_(rate));
            countsE.zero_();
        }
    }

    /// <summary>Zeroes the counts without moving the bias (Megatron's reset_model_temporary_tensors, for a layer not in training).</summary>
    public void ResetCounts()
    {
        using (torch.no_grad()) countsE.zero_();
    }

    public void Dispose()
    {
        biasE.Dispose();
        countsE.Dispose();
    }
}
