namespace Moe.Dsl;

/// <summary>The MoE router: how each token picks its experts, and the losses that keep experts balanced.</summary>
public sealed record Router
{
    /// <summary>Experts per token; null means the model's <c>num_experts_per_tok</c>. Megatron: <c>--moe-router-topk</c>.</summary>
    public int? TopK { get; init; }

    /// <summary>Score function. Megatron: <c>--moe-router-score-function</c> (default softmax).</summary>
    public ScoreFunction ScoreFunction { get; init; } = ScoreFunction.Softmax;

    /// <summary>
    /// Softmax over all experts before top-k, without renormalising (false: top-k of the logits, then
    /// softmax over the k, which equals Mixtral's renormalised weights). Megatron: <c>--moe-router-pre-softmax</c>.
    /// </summary>
    public bool PreSoftmax { get; init; }

    /// <summary>Load-balancing loss. Megatron: <c>--moe-router-load-balancing-type</c>.</summary>
    public LoadBalancing LoadBalancing { get; init; } = LoadBalancing.AuxLoss;

    /// <summary>Coefficient of the load-balancing loss; null means the model's <c>router_aux_loss_coef</c>. Megatron: <c>--moe-aux-loss-coeff</c>.</summary>
    public double? AuxLossCoeff { get; init; }

    /// <summary>Coefficient of the router z-loss (mean of logsumexp² of the logits); null for none. Megatron: <c>--moe-z-loss-coeff</c>.</summary>
    public double? ZLossCoeff { get; init; }

    /// <summary>Data type of the gating matmul and probabilities; null means the model's. Megatron: <c>--moe-router-dtype</c>.</summary>
    public RouterDtype? Dtype { get; init; }

    /// <summary>Expert groups for group-limited routing; null for none. Megatron: <c>--moe-router-num-groups</c>.</summary>
    public int? NumGroups { get; init; }

    /// <summary>Groups each token may route to under group-limited routing. Megatron: <c>--moe-router-group-topk</c>.</summary>
    public int? GroupTopK { get; init; }

    /// <summary>
    /// Aux-loss-free load balancing (DeepSeek-V3): a per-expert bias, not learned, added to the sigmoid scores
    /// when choosing experts (never to the combine weights) and moved after every optimizer step towards
    /// balance: bias += BiasUpdateRate · sign(mean count − count of the expert) over the global batch. Needs
    /// <see cref="ScoreFunction"/> = Sigmoid. Default false. Megatron: <c>--moe-router-enable-expert-bias</c>.
    /// </summary>
    public bool EnableExpertBias { get; init; }

    /// <summary>
    /// How far the expert bias moves per optimizer step (with <see cref="EnableExpertBias"/>); must be positive.
    /// Default 1e-3, as DeepSeek-V3. Megatron: <c>--moe-router-bias-update-rate</c>.
    /// </summary>
    public double BiasUpdateRate { get; init; } = 1e-3;
}
