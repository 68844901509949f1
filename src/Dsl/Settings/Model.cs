namespace Moe.Dsl;

/// <summary>
/// The architecture of a Mixtral-family model, with the field names of its Hugging Face
/// <c>config.json</c>. Presets carry the exact values of the hub configs; derive variants with
/// <c>with</c>, e.g. <c>Model.Mixtral8x7B with { Layers = 2 }</c>.
/// </summary>
public sealed record Model
{
    /// <summary>Display name used in messages and plans, e.g. "Mixtral 8x22B".</summary>
    public string Name { get; init; } = "custom model";

    /// <summary>The Hugging Face repository this preset mirrors, if any (e.g. "mistralai/Mixtral-8x7B-v0.1").</summary>
    public string? HubId { get; init; }

    /// <summary><c>hidden_size</c>. Megatron: <c>--hidden-size</c>.</summary>
    public int HiddenSize { get; init; }

    /// <summary><c>intermediate_size</c>: the FFN width of each expert. Megatron: <c>--ffn-hidden-size</c> / <c>--moe-ffn-hidden-size</c>.</summary>
    public int IntermediateSize { get; init; }

    /// <summary><c>num_hidden_layers</c>. Megatron: <c>--num-layers</c>.</summary>
    public int Layers { get; init; }

    /// <summary><c>num_attention_heads</c>. Megatron: <c>--num-attention-heads</c>.</summary>
    public int AttentionHeads { get; init; }

    /// <summary><c>num_key_value_heads</c> (grouped-query attention). Megatron: <c>--num-query-groups</c> with <c>--group-query-attention</c>.</summary>
    public int KeyValueHeads { get; init; }

    /// <summary><c>head_dim</c>; absent in the hub configs, where it is hidden_size / num_attention_heads. Megatron: <c>--kv-channels</c>.</summary>
    public int? HeadDim { get; init; }

    /// <summary><c>num_local_experts</c>: experts per MoE layer. Megatron: <c>--num-experts</c>.</summary>
    public int Experts { get; init; }

    /// <summary><c>num_experts_per_tok</c>: the router's top-k unless the recipe's Router sets one. Megatron: <c>--moe-router-topk</c>.</summary>
    public int ExpertsPerToken { get; init; }

    /// <summary><c>vocab_size</c>. Megatron pads it to a multiple of 128·TP (<c>--make-vocab-size-divisible-by</c>).</summary>
    public int VocabSize { get; init; }

    /// <summary><c>max_position_embeddings</c>. Megatron: <c>--max-position-embeddings</c>.</summary>
    public int MaxPositionEmbeddings { get; init; }

    /// <summary><c>rope_theta</c>. Megatron: <c>--rotary-base</c> (its default 10000 is wrong for Mixtral).</summary>
    public double RopeTheta { get; init; } = 1_000_000.0;

    /// <summary><c>rms_norm_eps</c>. Megatron: <c>--norm-epsilon</c>.</summary>
    public double RmsNormEps { get; init; } = 1e-5;

    /// <summary><c>router_aux_loss_coef</c>: the load-balancing coefficient the model was released with.</summary>
    public double RouterAuxLossCoef { get; init; } = 0.001;

    /// <summary><c>sliding_window</c>; null (all current Mixtral configs) means full causal attention.</summary>
    public int? SlidingWindow { get; init; }

    /// <summary><c>tie_word_embeddings</c>; false for Mixtral. Megatron: <c>--untie-embeddings-and-output-weights</c> when false.</summary>
    public bool TieWordEmbeddings { get; init; }

    /// <summary><c>bos_token_id</c>.</summary>
    public int BosTokenId { get; init; } = 1;

    /// <summary><c>eos_token_id</c>, also the end-of-document id in Megatron's datasets.</summary>
    public int EosTokenId { get; init; } = 2;

    /// <summary>The effective head dimension: <see cref="HeadDim"/>, else hidden_size / num_attention_heads.</summary>
    public int EffectiveHeadDim => HeadDim ?? (AttentionHeads > 0 ? HiddenSize / AttentionHeads : 0);

    /// <summary>Mixtral 8x7B v0.1 (config.json of mistralai/Mixtral-8x7B-v0.1).</summary>
    public static Model Mixtral8x7B { get; } = new()
    {
        Name = "Mixtral 8x7B",
        HubId = "mistralai/Mixtral-8x7B-v0.1",
        HiddenSize = 4096,
        IntermediateSize = 14336,
        Layers = 32,
        AttentionHeads = 32,
        KeyValueHeads = 8,
        Experts = 8,
        ExpertsPerToken = 2,
        VocabSize = 32000,
        MaxPositionEmbeddings = 32768,
        RopeTheta = 1_000_000.0,
        RmsNormEps = 1e-5,
        RouterAuxLossCoef = 0.02,
    };

    /// <summary>Mixtral 8x7B Instruct v0.1: the same architecture as the base model.</summary>
    public static Model Mixtral8x7BInstruct { get; } = Mixtral8x7B with
    {
        Name = "Mixtral 8x7B Instruct",
        HubId = "mistralai/Mixtral-8x7B-Instruct-v0.1",
    };

    /// <summary>Mixtral 8x22B v0.1 (mistralai repository: vocabulary 32768, 8 experts per layer).</summary>
    public static Model Mixtral8x22B { get; } = new()
    {
        Name = "Mixtral 8x22B",
        HubId = "mistralai/Mixtral-8x22B-v0.1",
        HiddenSize = 6144,
        IntermediateSize = 16384,
        Layers = 56,
        AttentionHeads = 48,
        KeyValueHeads = 8,
        Experts = 8,
        ExpertsPerToken = 2,
        VocabSize = 32768,
        MaxPositionEmbeddings = 65536,
        RopeTheta = 1_000_000.0,
        RmsNormEps = 1e-5,
        RouterAuxLossCoef = 0.001,
    };

    /// <summary>Mixtral 8x22B Instruct v0.1: the same architecture as the base model.</summary>
    public static Model Mixtral8x22BInstruct { get; } = Mixtral8x22B with
    {
        Name = "Mixtral 8x22B Instruct",
        HubId = "mistralai/Mixtral-8x22B-Instruct-v0.1",
    };

    /// <summary>
    /// A tiny Mixtral for CPU runs and tests: every mechanism of the real model (GQA, 4 experts,
    /// top-2 routing, RoPE) at a size that trains in minutes on two cores. Its vocabulary (1000)
    /// fits the small SentencePiece tokenizer shipped with recipes/TinyMixtral.
    /// </summary>
    public static Model TinyMixtral { get; } = new()
    {
        Name = "Tiny Mixtral",
        HiddenSize = 64,
        IntermediateSize = 128,
        Layers = 4,
        AttentionHeads = 4,
        KeyValueHeads = 2,
        Experts = 4,
        ExpertsPerToken = 2,
        VocabSize = 1000,
        MaxPositionEmbeddings = 4096,
        RopeTheta = 1_000_000.0,
        RmsNormEps = 1e-5,
        RouterAuxLossCoef = 0.02,
    };

    /// <summary>Total parameters (untied embedding and LM head, no biases).</summary>
    public long ParameterCount => Embeddings + (long)Layers * (AttentionParameters + NormParameters + RouterParameters + Experts * ExpertParameters) + HiddenSize;

    /// <summary>Parameters a token passes through: attention, router and top-k experts per layer, plus embeddings.</summary>
    public long ActiveParameterCount => Embeddings + (long)Layers * (AttentionParameters + NormParameters + RouterParameters + ExpertsPerToken * ExpertParameters) + HiddenSize;

    internal long Embeddings => (long)VocabSize * HiddenSize * (TieWordEmbeddings ? 1 : 2);

    internal long AttentionParameters => (long)HiddenSize * EffectiveHeadDim * (2L * AttentionHeads + 2L * KeyValueHeads);

    internal long NormParameters => 2L * HiddenSize;

    internal long RouterParameters => (long)Experts * HiddenSize;

    internal long ExpertParameters => 3L * HiddenSize * IntermediateSize;
}
