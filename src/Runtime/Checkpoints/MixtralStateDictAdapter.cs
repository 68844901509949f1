using System.Text.Json;
using Moe.Runtime.Commands;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Checkpoints;

/// <summary>A hub-named tensor and where it lives in the model: a parameter or a slice of one.</summary>
/// <param name="Key">Hub key, e.g. model.layers.0.block_sparse_moe.experts.3.w1.weight.</param>
/// <param name="Parameter">The model parameter holding it.</param>
/// <param name="Slice">Selects the tensor from the parameter (or its gradient).</param>
/// <param name="Block">Selects, from the whole hub tensor, the block this rank holds, shaped like <paramref name="Slice"/>'s result (null: the whole tensor, same shape).</param>
/// <param name="HubShape">The hub shape of this rank's block when <paramref name="Slice"/> gives another view of it (q/k/v in the grouped layout); null when it is the same.</param>
public sealed record HubTensor(string Key, TorchSharp.Modules.Parameter Parameter, Func<Tensor, Tensor> Slice, Func<Tensor, Tensor>? Block = null, long[]? HubShape = null);

/// <summary>
/// Maps Hugging Face Mixtral checkpoints (hub key names) to our grouped expert tensors and back
/// (torchtitan's state_dict_adapter pattern): per-expert w1/w3 become rows of gate_up [E, 2I, H], w2
/// becomes down [E, H, I]. Also reads transformers 5's fused names (mlp.experts.gate_up_proj / down_proj).
/// </summary>
public static class MixtralStateDictAdapter
{
    /// <summary>Every hub tensor of this rank's model in checkpoint order (its own experts, and its FFN slice of each under expert tensor parallel).</summary>
    public static IReadOnlyList<HubTensor> HubTensors(MixtralModel model)
    {
        var c = model.Config;
        var list = new List<HubTensor>
        {
            new("lm_head.weight", model.LmHead, t => t),
            new("model.embed_tokens.weight", model.Embedding, t => t),
        };
        for (int l = 0; l < c.Layers; l++)
        {
            var layer = model.Layers[l];
            string p = $"model.layers.{l}.";
            var place = layer.Moe.Dispatcher.Placement;
            long slice = c.IntermediateSize / place.TensorSize, at = place.TensorRank * slice;
            Func<Tensor, Tensor>? rows = place.TensorSize == 1 ? null : t => t.narrow(0, at, slice);
            Func<Tensor, Tensor>? columns = place.TensorSize == 1 ? null : t => t.narrow(1, at, slice);
            for (int e = place.FirstExpert; e < place.FirstExpert + place.LocalExperts; e++)
            {
                int j = e - place.FirstExpert;
                string ep = $"{p}block_sparse_moe.experts.{e}.";
                list.Add(new(ep + "w1.weight", layer.Moe.ExpertWeights.GateUp, t => t[j].narrow(0, 0, slice), rows));
                list.Add(new(ep + "w2.weight", layer.Moe.ExpertWeights.Down, t => t[j], columns));
                list.Add(new(ep + "w3.weight", layer.Moe.ExpertWeights.GateUp, t => t[j].narrow(0, slice, slice), rows));
            }
            list.Add(new(p + "block_sparse_moe.gate.weight", layer.Moe.Gate, t => t));
            list.Add(new(p + "input_layernorm.weight", layer.InputNorm, t => t));
            list.Add(new(p + "post_attention_layernorm.weight", layer.PostAttentionNorm, t => t));
            // q/k/v live in Megatron's grouped layout [g, r + 2, d, H]; each hub tensor is a view of it, and the hub
            // tensor's rows for this rank's groups are viewed the same way.
            var a = layer.SelfAttention;
            int g = a.Groups, r = a.QueryHeadsPerGroup, d = a.HeadDim;
            long firstGroup = (long)model.TensorRank * g;
            Func<Tensor, Tensor> Rows(int heads) => hub => hub.view(-1, heads, d, hub.shape[^1]).narrow(0, firstGroup, g);
            long h = c.HiddenSize;
            list.Add(new(p + "self_attn.k_proj.weight", a.Qkv, t => a.GroupedView(t).narrow(1, r, 1), Rows(1), [(long)g * d, h]));
            list.Add(new(p + "self_attn.o_proj.weight", a.O, t => t, model.TensorSize == 1 ? null : hub => hub.narrow(1, firstGroup * r * d, (long)g * r * d)));
            list.Add(new(p + "self_attn.q_proj.weight", a.Qkv, t => a.GroupedView(t).narrow(1, 0, r), Rows(r), [(long)g * r * d, h]));
            list.Add(new(p + "self_attn.v_proj.weight", a.Qkv, t => a.GroupedView(t).narrow(1, r + 1, 1), Rows(1), [(long)g * d, h]));
        }
        list.Add(new("model.norm.weight", model.FinalNorm, t => t));
        return list;
    }

    /// <summary>
    /// Builds the model a Hugging Face directory describes (config.json) and loads its weights
    /// (<see cref="Load"/>). <paramref name="options"/> default to transformers' Mixtral semantics with the
    /// config's top-k.
    /// </summary>
    public static MixtralModel LoadModel(string directory, ScalarType dtype, Device device, MoeOptions? options = null)
    {
        var config = ReadConfig(directory);
        var model = new MixtralModel(config, options ?? new MoeOptions { TopK = config.TopK }, dtype, device);
        try
        {
            Load(model, directory);
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>Reads config.json of a Hugging Face model directory.</summary>
    public static MixtralConfig ReadConfig(string directory) => MixtralConfig.Load(System.IO.Path.Combine(directory, "config.json"));

    /// <summary>
    /// Copies a Hugging Face checkpoint (model.safetensors, or shards listed in model.safetensors.index.json)
    /// into the model, one tensor at a time from memory-mapped files. Missing, unexpected or mis-shaped
    /// tensors are a <see cref="UserError"/> naming the file and the tensor.
    /// </summary>
    public static void Load(MixtralModel model, string directory)
    {
        var files = OpenCheckpoint(directory);
        try
        {
            var byKey = new Dictionary<string, SafetensorsFile>(StringComparer.Ordinal);
            foreach (var f in files.Distinct())
                foreach (var k in f.Entries.Keys) byKey[k] = f;
            var used = new HashSet<string>(StringComparer.Ordinal);
            using var _ = torch.no_grad();
            foreach (var h in HubTensors(model))
            {
                var target = h.Slice(h.Parameter);
                if (byKey.TryGetValue(h.Key, out var file))
                {
                    CopyInto(target, file, h.Key, h.Block);
                    used.Add(h.Key);
                }
                else if (!LoadFused(model, h, byKey, used))
                {
                    throw new UserError($"{directory}: the checkpoint has no tensor '{h.Key}' (looked in {string.Join(", ", files.Distinct().Select(f => System.IO.Path.GetFileName(f.Path)))}); " +
                        "is it a Mixtral checkpoint with the config's layer and expert counts?");
                }
            }
            foreach (var (key, layer) in ExpertBiasKeys(model))
            {
                // A hub Mixtral checkpoint has no bias: an aux-loss-free run then starts from zeros, as Megatron does.
                if (!byKey.TryGetValue(key, out var file)) continue;
                CopyInto(layer.Moe.ExpertBias!.BiasE, file, key);
                used.Add(key);
            }
            var unexpected = byKey.Keys.Where(k => !used.Contains(k) && !k.EndsWith("rotary_emb.inv_freq", StringComparison.Ordinal)).OrderBy(k => k, StringComparer.Ordinal).ToArray();
            if (unexpected.FirstOrDefault(k => k.EndsWith(ExpertBiasSuffix, StringComparison.Ordinal)) is string bias)
                throw new UserError($"{directory}: the checkpoint holds an aux-loss-free expert bias ('{bias}' in {System.IO.Path.GetFileName(byKey[bias].Path)}) that this model would ignore; " +
                    "load it with Router.EnableExpertBias = true and ScoreFunction = Sigmoid, as it was trained.");
            if (unexpected.Length > 0)
                throw new UserError($"{directory}: the checkpoint has {unexpected.Length} tensor(s) this Mixtral config does not use, e.g. '{unexpected[0]}' in {System.IO.Path.GetFileName(byKey[unexpected[0]].Path)}; check config.json against the weights.");
        }
        finally
        {
            foreach (var f in files.Distinct()) f.Dispose();
        }
    }

    private const string ExpertBiasSuffix = "block_sparse_moe.gate.e_score_correction_bias";

    /// <summary>
    /// Hub keys of the aux-loss-free expert bias of every layer that has one (Router.EnableExpertBias): a routing
    /// buffer, not a parameter, saved under DeepSeek-V3's Hugging Face name (gate.e_score_correction_bias) so a
    /// trained model keeps the routing it learned. Not in <see cref="HubTensors"/>: it has no gradient.
    /// </summary>
    public static IEnumerable<(string Key, DecoderLayer Layer)> ExpertBiasKeys(MixtralModel model) =>
        model.Layers.Select((layer, l) => ($"model.layers.{l}.{ExpertBiasSuffix}", layer)).Where(x => x.layer.Moe.ExpertBias is not null);

    /// <summary>transformers 5 names: mlp.gate.weight, mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I].</summary>
    private static bool LoadFused(MixtralModel model, HubTensor h, Dictionary<string, SafetensorsFile> byKey, HashSet<string> used)
    {
        var parts = h.Key.Split('.');
        if (parts.Length < 5 || parts[0] != "model" || parts[1] != "layers" || parts[3] != "block_sparse_moe") return false;
        string layerPrefix = $"model.layers.{parts[2]}.mlp.";
        var layer = model.Layers[int.Parse(parts[2], System.Globalization.CultureInfo.InvariantCulture)];
        if (parts[4] == "gate" && byKey.TryGetValue(layerPrefix + "gate.weight", out var g))
        {
            CopyInto(layer.Moe.Gate, g, layerPrefix + "gate.weight");
            used.Add(layerPrefix + "gate.weight");
            return true;
        }
        if (parts[4] != "experts") return false;
        string fused = parts[6] == "w2" ? layerPrefix + "experts.down_proj" : layerPrefix + "experts.gate_up_proj";
        if (!byKey.TryGetValue(fused, out var f)) return false;
        if (used.Add(fused))
        {
            // This rank's experts, and its FFN slice of each, as the model's parameter shard says.
            var weight = parts[6] == "w2" ? layer.Moe.ExpertWeights.Down : layer.Moe.ExpertWeights.GateUp;
            var shard = model.ParametersInForwardOrder().Single(p => ReferenceEquals(p.Parameter, weight)).Shard;
            CopyInto(weight, f, fused, shard.IsWhole ? null : t => shard.Slice(t).reshape(weight.shape));
        }
        return true;
    }

    private static void CopyInto(Tensor target, SafetensorsFile file, string key, Func<Tensor, Tensor>? block = null)
    {
        var entry = file.Entry(key);
        using var source = file.Map(key);   // zero-copy view of the mapped bytes; copy_ converts dtype and device
        using var mine = block is null ? source.alias() : block(source);   // this rank's block, still a view of the file
        if (!mine.shape.SequenceEqual(target.shape))
            throw new UserError($"{file.Path}: tensor '{key}' has shape [{string.Join(", ", entry.Shape)}] but the model expects [{string.Join(", ", target.shape)}]{(block is null ? "" : " for this rank's block")} from config.json.");
        if (!source.is_floating_point())
            throw new UserError($"{file.Path}: tensor '{key}' is {entry.Dtype}; weights must be floating point.");
        target.copy_(mine);
    }

    private static List<SafetensorsFile> OpenCheckpoint(string directory)
    {
        if (!Directory.Exists(directory)) throw new UserError($"{directory}: no such checkpoint directory.");
        string index = System.IO.Path.Combine(directory, "model.safetensors.index.json");
        string single = System.IO.Path.Combine(directory, "model.safetensors");
        var files = new List<SafetensorsFile>();
        if (File.Exists(index))
        {
            using var doc = JsonFile.Parse(index);
            if (!doc.RootElement.TryGetProperty("weight_map", out var map))
                throw new UserError($"{index}: no \"weight_map\"; a sharded checkpoint's index maps every tensor to its shard.");
            var opened = new Dictionary<string, SafetensorsFile>(StringComparer.Ordinal);
            try
            {
                foreach (var p in map.EnumerateObject())
                {
                    string shard = p.Value.GetString()!;
                    if (!opened.TryGetValue(shard, out var f))
                    {
                        string shardPath = System.IO.Path.Combine(directory, shard);
                        if (!File.Exists(shardPath)) throw new UserError($"{index}: lists shard {shard} for '{p.Name}', but {shardPath} does not exist.");
                        opened[shard] = f = SafetensorsFile.Open(shardPath);
                    }
                    if (!f.Entries.ContainsKey(p.Name))
                        throw new UserError($"{index}: maps '{p.Name}' to {shard}, which does not hold it.");
                    files.Add(f);
                }
            }
            catch
            {
                foreach (var f in opened.Values) f.Dispose();
                throw;
            }
            return files.Distinct().ToList();
        }
        if (File.Exists(single)) return new List<SafetensorsFile> { SafetensorsFile.Open(single) };
        throw new UserError($"{directory}: neither model.safetensors nor model.safetensors.index.json is there.");
    }

    /// <summary>Writes config.json and model.safetensors with hub names (the weights, or with <paramref name="gradients"/> their gradients).</summary>
    public static IEnumerable<KeyValuePair<string, Tensor>> Named(MixtralModel model, bool gradients = false) =>
        HubTensors(model).Select(h =>
        {
            var source = gradients ? h.Parameter.grad ?? torch.zeros_like(h.Parameter) : (Tensor)h.Parameter;
            var tensor = h.Slice(source.detach());
            return new KeyValuePair<string, Tensor>(h.Key, h.HubShape is null ? tensor : tensor.reshape(h.HubShape));
        });

    /// <summary>
    /// Saves the model as a Hugging Face checkpoint directory with hub key names: config.json plus
    /// model.safetensors, or — when the weights exceed <paramref name="maxShardBytes"/> — shards
    /// model-0000i-of-0000N.safetensors and model.safetensors.index.json (<c>metadata.total_size</c>,
    /// <c>weight_map</c>), as transformers' save_pretrained writes them. Tensors keep the model's dtype and are
    /// copied to the CPU one at a time; every file is written to a temporary name and renamed when complete.
    /// Layers with an aux-loss-free expert bias add it in fp32 (<see cref="ExpertBiasKeys"/>).
    /// </summary>
    /// <param name="model">The model to save.</param>
    /// <param name="directory">Created if absent; existing files of the same names are replaced.</param>
    /// <param name="maxShardBytes">Largest shard (transformers' default max_shard_size is 5 GB; a tensor larger than it gets a shard of its own).</param>
    public static void Save(MixtralModel model, string directory, long maxShardBytes = 5_000_000_000)
    {
        if (model.Layers.Any(l => l.Moe.Dispatcher.Placement.LocalExperts != model.Config.Experts || l.Moe.Dispatcher.Placement.TensorSize != 1))
            throw new UserError("This rank holds only some experts (expert parallel): a Hugging Face folder needs them all; save a distributed checkpoint instead.");
        Directory.CreateDirectory(directory);
        var shards = new List<List<KeyValuePair<string, Tensor>>> { new() };
        long shardBytes = 0, totalBytes = 0;
        var named = Named(model).Concat(ExpertBiasKeys(model).Select(b => new KeyValuePair<string, Tensor>(b.Key, b.Layer.Moe.ExpertBias!.BiasE)));
        foreach (var kv in named)
        {
            long bytes = kv.Value.NumberOfElements * kv.Value.ElementSize;
            if (shards[^1].Count > 0 && shardBytes + bytes > maxShardBytes)
            {
                shards.Add(new());
                shardBytes = 0;
            }
            shards[^1].Add(kv);
            shardBytes += bytes;
            totalBytes += bytes;
        }
        if (shards.Count == 1)
        {
            SafetensorsFile.Write(System.IO.Path.Combine(directory, "model.safetensors"), shards[0]);
        }
        else
        {
            var weightMap = new SortedDictionary<string, string>(StringComparer.Ordinal);
            for (int i = 0; i < shards.Count; i++)
            {
                string shard = $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
                SafetensorsFile.Write(System.IO.Path.Combine(directory, shard), shards[i]);
                foreach (var (key, _) in shards[i]) weightMap[key] = shard;
            }
            var index = new Dictionary<string, object>
            {
                ["metadata"] = new Dictionary<string, long> { ["total_size"] = totalBytes },
                ["weight_map"] = weightMap,
            };
            WriteJson(System.IO.Path.Combine(directory, "model.safetensors.index.json"), index);
        }
        var c = model.Config;
        var config = new Dictionary<string, object?>
        {
            ["architectures"] = new[] { "MixtralForCausalLM" },
            ["model_type"] = "mixtral",
            ["vocab_size"] = c.VocabSize,
            ["hidden_size"] = c.HiddenSize,
            ["intermediate_size"] = c.IntermediateSize,
            ["num_hidden_layers"] = c.Layers,
            ["num_attention_heads"] = c.Heads,
            ["num_key_value_heads"] = c.KeyValueHeads,
            ["head_dim"] = c.HeadDim,
            ["num_local_experts"] = c.Experts,
            ["num_experts_per_tok"] = c.TopK,
            ["rope_theta"] = c.RopeTheta,
            ["rms_norm_eps"] = c.RmsNormEps,
            ["router_aux_loss_coef"] = c.RouterAuxLossCoef,
            ["max_position_embeddings"] = c.MaxPositionEmbeddings,
            ["tie_word_embeddings"] = c.TieWordEmbeddings,
            ["rope_parameters"] = new Dictionary<string, object> { ["rope_theta"] = c.RopeTheta, ["rope_type"] = "default" },
            ["sliding_window"] = c.SlidingWindow,
            ["hidden_act"] = c.HiddenAct,
            ["attention_dropout"] = c.AttentionDropout,
            ["router_jitter_noise"] = c.RouterJitterNoise,
            ["output_router_logits"] = c.OutputRouterLogits,
            ["initializer_range"] = c.InitializerRange,
            ["bos_token_id"] = c.BosTokenId,
            ["eos_token_id"] = c.EosTokenId,
            ["torch_dtype"] = model.Dtype == ScalarType.BFloat16 ? "bfloat16" : "float32",
        };
        WriteJson(System.IO.Path.Combine(directory, "config.json"), config);
    }

    private static void WriteJson(string path, object value)
    {
        File.WriteAllText(path + ".tmp", JsonSerializer.Serialize(value, new JsonSerializerOptions { WriteIndented = true }));
        File.Move(path + ".tmp", path, overwrite: true);
    }
}
