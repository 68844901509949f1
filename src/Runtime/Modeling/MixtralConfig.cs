using System.Text.Json;
using Moe.Runtime.Commands;

namespace Moe.Runtime.Modeling;

/// <summary>
/// A Mixtral config as Hugging Face transformers reads config.json, with transformers' defaults for
/// absent fields (configuration_mixtral.py): head_dim = hidden / heads, num_key_value_heads = heads,
/// rope_theta 1e6 (or transformers 5's rope_parameters.rope_theta), rms_norm_eps 1e-5,
/// router_aux_loss_coef 0.001, max_position_embeddings 4096·32, router_jitter_noise 0, sliding_window none
/// (a number is honoured as transformers' sliding-window causal mask), hidden_act silu, attention_dropout 0,
/// bos/eos 1/2, initializer_range 0.02. Values Moe does not implement (another activation, attention
/// dropout, router jitter, a non-default rope_type) are rejected with a <see cref="UserError"/>.
/// </summary>
public sealed record MixtralConfig
{
    public int VocabSize { get; init; }
    public int HiddenSize { get; init; }
    public int IntermediateSize { get; init; }
    public int Layers { get; init; }
    public int Heads { get; init; }
    public int KeyValueHeads { get; init; }
    public int HeadDim { get; init; }
    public int Experts { get; init; }
    public int TopK { get; init; }
    public double RopeTheta { get; init; } = 1e6;
    public double RmsNormEps { get; init; } = 1e-5;
    public double RouterAuxLossCoef { get; init; } = 0.001;
    public int MaxPositionEmbeddings { get; init; } = 4096 * 32;
    public bool TieWordEmbeddings { get; init; }
    public int? SlidingWindow { get; init; }
    public string HiddenAct { get; init; } = "silu";
    public double AttentionDropout { get; init; }
    public double RouterJitterNoise { get; init; }
    public bool OutputRouterLogits { get; init; }
    public int? BosTokenId { get; init; } = 1;
    public int? EosTokenId { get; init; } = 2;
    public double InitializerRange { get; init; } = 0.02;

    /// <summary>The dtype the checkpoint was saved in (torch_dtype, or transformers 5's dtype); null when absent.</summary>
    public string? TorchDtype { get; init; }

    /// <summary>The config of a Dsl model preset.</summary>
    public static MixtralConfig From(Dsl.Model m) => new()
    {
        VocabSize = m.VocabSize,
        HiddenSize = m.HiddenSize,
        IntermediateSize = m.IntermediateSize,
        Layers = m.Layers,
        Heads = m.AttentionHeads,
        KeyValueHeads = m.KeyValueHeads,
        HeadDim = m.EffectiveHeadDim,
        Experts = m.Experts,
        TopK = m.ExpertsPerToken,
        RopeTheta = m.RopeTheta,
        RmsNormEps = m.RmsNormEps,
        RouterAuxLossCoef = m.RouterAuxLossCoef,
        MaxPositionEmbeddings = m.MaxPositionEmbeddings,
        TieWordEmbeddings = m.TieWordEmbeddings,
        SlidingWindow = m.SlidingWindow,
    };

    /// <summary>Reads config.json; a missing or malformed field is a <see cref="UserError"/> naming the file and the field.</summary>
    public static MixtralConfig Load(string path)
    {
        if (!File.Exists(path)) throw new UserError($"{path}: no config.json; a Hugging Face model directory holds config.json and model*.safetensors.");
        using var doc = JsonFile.Parse(path);
        return Parse(doc.RootElement, path);
    }

    /// <summary>Reads a config.json object (e.g. the model_config of a Moe checkpoint's metadata); <paramref name="path"/> names it in errors.</summary>
    public static MixtralConfig Parse(JsonElement root, string path)
    {
        {
            if (root.TryGetProperty("model_type", out var type) && type.GetString() is string t && t != "mixtral")
                throw new UserError($"{path}: model_type is \"{t}\"; Moe reads Mixtral checkpoints (model_type \"mixtral\").");
            int Int(string name)
            {
                if (!root.TryGetProperty(name, out var v) || v.ValueKind != JsonValueKind.Number)
                    throw new UserError($"{path}: \"{name}\" is missing or not a number.");
                return v.GetInt32();
            }
            int? OptionalInt(string name) => root.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetInt32() : null;
            double? OptionalDouble(string name) => root.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetDouble() : null;
            int hidden = Int("hidden_size"), heads = Int("num_attention_heads");
            double theta = OptionalDouble("rope_theta")
                ?? (root.TryGetProperty("rope_parameters", out var rp) && rp.ValueKind == JsonValueKind.Object && rp.TryGetProperty("rope_theta", out var rt) ? rt.GetDouble() : 1e6);
            if (root.TryGetProperty("rope_parameters", out var rpt) && rpt.ValueKind == JsonValueKind.Object
                && rpt.TryGetProperty("rope_type", out var rtype) && rtype.GetString() is string ropeType && ropeType != "default")
                throw new UserError($"{path}: rope_type \"{ropeType}\" is not supported; Moe implements the default rotary embedding.");
            if ((OptionalDouble("router_jitter_noise") ?? 0) != 0)
                throw new UserError($"{path}: router_jitter_noise is not 0; Moe does not implement router jitter (Mixtral's configs use 0).");
            string act = root.TryGetProperty("hidden_act", out var a) && a.ValueKind == JsonValueKind.String ? a.GetString()! : "silu";
            if (act != "silu")
                throw new UserError($"{path}: hidden_act is \"{act}\"; Mixtral's experts are SwiGLU (hidden_act \"silu\"), the only activation Moe implements.");
            double attentionDropout = OptionalDouble("attention_dropout") ?? 0;
            if (attentionDropout != 0)
                throw new UserError($"{path}: attention_dropout is {attentionDropout}; Moe does not implement attention dropout (Mixtral's configs use 0.0). Set it to 0.0.");
            int? sliding = OptionalInt("sliding_window");
            if (sliding is <= 0)
                throw new UserError($"{path}: sliding_window is {sliding}; it must be a positive number of tokens or null.");
            string? StringOrNull(string name) => root.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;
            return new MixtralConfig
            {
                VocabSize = Int("vocab_size"),
                HiddenSize = hidden,
                IntermediateSize = Int("intermediate_size"),
                Layers = Int("num_hidden_layers"),
                Heads = heads,
                KeyValueHeads = OptionalInt("num_key_value_heads") ?? heads,
                HeadDim = OptionalInt("head_dim") ?? hidden / heads,
                Experts = Int("num_local_experts"),
                TopK = Int("num_experts_per_tok"),
                RopeTheta = theta,
                RmsNormEps = OptionalDouble("rms_norm_eps") ?? 1e-5,
                RouterAuxLossCoef = OptionalDouble("router_aux_loss_coef") ?? 0.001,
                MaxPositionEmbeddings = OptionalInt("max_position_embeddings") ?? 4096 * 32,
                TieWordEmbeddings = root.TryGetProperty("tie_word_embeddings", out var tie) && tie.ValueKind == JsonValueKind.True,
                SlidingWindow = sliding,
                HiddenAct = act,
                AttentionDropout = attentionDropout,
                RouterJitterNoise = 0,
                OutputRouterLogits = root.TryGetProperty("output_router_logits", out var orl) && orl.ValueKind == JsonValueKind.True,
                BosTokenId = root.TryGetProperty("bos_token_id", out var bos) ? (bos.ValueKind == JsonValueKind.Number ? bos.GetInt32() : null) : 1,
                EosTokenId = root.TryGetProperty("eos_token_id", out var eos) ? (eos.ValueKind == JsonValueKind.Number ? eos.GetInt32() : null) : 2,
                InitializerRange = OptionalDouble("initializer_range") ?? 0.02,
                TorchDtype = StringOrNull("torch_dtype") ?? StringOrNull("dtype"),
            };
        }
    }
}
