using Moe.Dsl;

namespace Moe.Runtime.MixtureOfExperts;

/// <summary>Which formula the load-balancing loss follows.</summary>
public enum AuxLossConvention
{
    /// <summary>
    /// transformers 5.17's load_balancing_loss_func: one loss over all layers' tokens concatenated,
    /// E · Σ_e f_e · P̄_e with f_e the fraction of top-k selections, not divided by k. Used to check
    /// parity with Hugging Face (moe forward).
    /// </summary>
    Transformers,

    /// <summary>Megatron-Core's per-layer losses, summed over layers (router.py, moe_utils.py); what recipes train with.</summary>
    Megatron,
}

/// <summary>
/// The MoE semantics a layer follows: routing, capacity and losses. Defaults reproduce transformers'
/// Mixtral (softmax over all experts, top-k, renormalised, dropless).
/// </summary>
public sealed record MoeOptions
{
    /// <summary>Experts per token, K (Megatron --moe-router-topk; config.json num_experts_per_tok).</summary>
    public int TopK { get; init; } = 2;

    /// <summary>Score function (Megatron --moe-router-score-function): softmax (Mixtral) or sigmoid (DeepSeek-V3).</summary>
    public ScoreFunction ScoreFunction { get; init; } = ScoreFunction.Softmax;

    /// <summary>Softmax over all experts then top-k, without renormalising (--moe-router-pre-softmax).</summary>
    public bool PreSoftmax { get; init; }

    /// <summary>
    /// Load-balancing loss type (Megatron --moe-router-load-balancing-type): aux_loss (per micro-batch),
    /// seq_aux_loss (per sequence), global_aux_loss (counts over the global batch) or none. With
    /// <see cref="AuxLossConvention.Transformers"/> any value but None selects transformers' formula.
    /// </summary>
    public LoadBalancing LoadBalancing { get; init; } = LoadBalancing.AuxLoss;

    /// <summary>Formula family of the load-balancing loss.</summary>
    public AuxLossConvention AuxLossConvention { get; init; } = AuxLossConvention.Transformers;

    /// <summary>Capacity factor (Megatron --moe-expert-capacity-factor): C = ceil(T·K/E · factor) rows per expert; null = dropless.</summary>
    public double? CapacityFactor { get; init; }

    /// <summary>Which pairs an over-full expert keeps (Megatron --moe-token-drop-policy): highest weights (probs) or earliest (position).</summary>
    public DropPolicy DropPolicy { get; init; } = DropPolicy.Probs;

    /// <summary>Pad every expert's input to its capacity (Megatron --moe-pad-expert-input-to-capacity; compute only, padded rows carry weight 0).</summary>
    public bool PadToCapacity { get; init; }

    /// <summary>Whether a z-loss is computed (Megatron: --moe-z-loss-coeff set); the caller multiplies by the coefficient.</summary>
    public bool ZLoss { get; init; }

    /// <summary>
    /// Data type of the gating matmul, the top-k of post-softmax routing, the z-loss and the combine weights
    /// (Megatron --moe-router-dtype); null = the model dtype. Scores are computed in fp32 whatever it is, as
    /// Megatron computes its softmax and sigmoid.
    /// </summary>
    public RouterDtype? RouterDtype { get; init; }

    /// <summary>Expert groups for group-limited routing (Megatron --moe-router-num-groups); used only with <see cref="GroupTopK"/>.</summary>
    public int? NumGroups { get; init; }

    /// <summary>Groups each token may route to (Megatron --moe-router-group-topk); null = plain top-k.</summary>
    public int? GroupTopK { get; init; }

    /// <summary>
    /// Aux-loss-free load balancing (Megatron --moe-router-enable-expert-bias): a per-expert bias added to the
    /// sigmoid scores for selection only, moved by <see cref="BiasUpdateRate"/> after every global batch.
    /// </summary>
    public bool ExpertBias { get; init; }

    /// <summary>Step of the expert-bias update per global batch (Megatron --moe-router-bias-update-rate, default 1e-3).</summary>
    public double BiasUpdateRate { get; init; } = 1e-3;

    /// <summary>The options a recipe asks for (Megatron conventions).</summary>
    public static MoeOptions From(RecipeSettings s) => new()
    {
        TopK = s.TopK,
        ScoreFunction = s.Router.ScoreFunction,
        PreSoftmax = s.Router.PreSoftmax,
        LoadBalancing = s.Router.LoadBalancing,
        AuxLossConvention = AuxLossConvention.Megatron,
        CapacityFactor = s.Capacity.Factor,
        DropPolicy = s.Capacity.DropPolicy,
        PadToCapacity = s.Capacity.PadToCapacity,
        ZLoss = s.Router.ZLossCoeff is > 0,
        RouterDtype = s.Router.Dtype,
        NumGroups = s.Router.NumGroups,
        GroupTopK = s.Router.GroupTopK,
        ExpertBias = s.Router.EnableExpertBias,
        BiasUpdateRate = s.Router.BiasUpdateRate,
    };
}
