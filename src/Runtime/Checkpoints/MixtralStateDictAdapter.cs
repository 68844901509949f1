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
/// <param name="Block">The block of the whole hub tensor this rank holds (null: the whole tensor), in the hub tensor's shape; its geometry lets a checkpoint record and reshard it.</param>
/// <param name="HubShape">
/// The hub shape of this rank's block when <paramref name="Slice"/> gives another view of the same elements (q/k/v
/// live in Megatron's grouped layout, where a hub tensor's rows are a [groups, heads, d, H] view); null when it is
/// the slice's own shape.
/// </param>
public sealed record HubTensor(string Key, TorchSharp.Modules.Parameter Parameter, Func<Tensor, Tensor> Slice, TensorShard? Block = null, long[]? HubShape = null)
{
    /// <summary>Whether this rank holds only part of the hub tensor.</summary>
    public bool IsPartial => Block is { IsWhole: false };

    /// <summary>
    /// Whether another tensor rank holds the same block and writes it (replicated key-value heads, Megatron R017: the
    /// k/v rows of a group on every rank of the group but the first). Loading fills it all the same.
    /// </summary>
    public bool Duplicate { get; init; }

    /// <summary>The shape this rank's block has in the hub tensor's layout.</summary>
    public long[] BlockShape => HubShape ?? Block?.LocalShape ?? Slice(Parameter).shape;

    /// <summary>This rank's block of <paramref name="source"/> (the parameter or its gradient), in the hub tensor's shape (a copy when the view cannot be reshaped).</summary>
    public Tensor Read(Tensor source)
    {
        var view = Slice(source);
        return HubShape is null ? view : view.reshape(HubShape);
    }
}

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
        // Tensor parallel: the LM head and the embedding are split by vocabulary rows. A pipeline stage has its own
        // layers (global numbers), the first also the embedding, the last the norm and head.
        TensorShard? vocab = model.TensorSize > 1 ? model.TensorParallel.VocabShard(c.VocabSize, c.HiddenSize) : null;
        var list = new List<HubTensor>();
        if (model.Stage.HoldsHead) list.Add(new("lm_head.weight", model.LmHead, t => t, vocab));
        if (model.Stage.HoldsEmbedding) list.Add(new("model.embed_tokens.weight", model.Embedding, t => t, vocab));
        for (int i = 0; i < model.Layers.Count; i++)
        {
            var layer = model.Layers[i];
            string p = $"model.layers.{model.LayerNumbers[i]}.";
            var place = layer.Moe.Dispatcher.Placement;
            long slice = c.IntermediateSize / place.TensorSize, at = place.TensorRank * slice;
            // Expert tensor parallel: rows [at, at + slice) of w1 and w3 [I, H], the same columns of w2 [H, I].
            TensorShard? rows = place.TensorSize == 1 ? null : new TensorShard([c.IntermediateSize, c.HiddenSize], [slice, c.HiddenSize], [at, 0]);
            TensorShard? columns = place.TensorSize == 1 ? null : new TensorShard([c.HiddenSize, c.IntermediateSize], [c.HiddenSize, slice], [0, at]);
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
            // q/k/v live in Megatron's grouped layout [g, r + 2, d, H]: each hub tensor is a view of it, and under tensor
            // parallelism this rank's block of a hub tensor is its g groups' rows (o_proj: the same heads' columns). With
            // replicated key-value heads (TP > Nkv, R017) the rank holds Nq/TP query heads and one group's k/v rows, which
            // the group's first rank writes.
            var a = layer.SelfAttention;
            var tp = model.TensorParallel;
            int g = a.Groups, r = a.QueryHeadsPerGroup, d = a.HeadDim;
            long h = c.HiddenSize, queryHeads = (long)g * r, firstQuery = tp.Rank * queryHeads;
            long firstGroup = tp.KeyValueReplicas > 1 ? tp.KeyValueGroup : (long)tp.Rank * g;
            bool split = model.TensorSize > 1, duplicate = tp.KeyValueReplicas > 1 && tp.Rank % tp.KeyValueReplicas != 0;
            TensorShard? query = split ? new TensorShard([(long)c.Heads * d, h], [queryHeads * d, h], [firstQuery * d, 0]) : null;
            TensorShard? keyValue = split ? new TensorShard([(long)c.KeyValueHeads * d, h], [(long)g * d, h], [firstGroup * d, 0]) : null;
            TensorShard? heads = split ? new TensorShard([h, (long)c.Heads * d], [h, queryHeads * d], [0, firstQuery * d]) : null;
            list.Add(new(p + "self_attn.k_proj.weight", a.Qkv, t => a.GroupedView(t).narrow(1, r, 1), keyValue, [(long)g * d, h]) { Duplicate = duplicate });
            list.Add(new(p + "self_attn.o_proj.weight", a.O, t => t, heads));
            list.Add(new(p + "self_attn.q_proj.weight", a.Qkv, t => a.GroupedView(t).narrow(1, 0, r), query, [queryHeads * d, h]));
            list.Add(new(p + "self_attn.v_proj.weight", a.Qkv, t => a.GroupedView(t).narrow(1, r + 1, 1), keyValue, [(long)g * d, h]) { Duplicate = duplicate });
        }
        if (model.Stage.HoldsHead) list.Add(new("model.norm.weight", model.FinalNorm, t => t));
        return list;
    }

    /// <summary>
    /// Every hub tensor of the whole model (all experts, whole FFNs) with its shape, in <see cref="HubTensors"/>' order:
    /// what a checkpoint of any layout must hold, and what an export writes. Kept beside <see cref="HubTensors"/>, whose
    /// names and shapes it repeats (a test holds the two equal for a one-device model).
    /// </summary>
    public static IReadOnlyList<(string Key, long[] Shape)> HubShapes(MixtralConfig c)
    {
        long v = c.VocabSize, h = c.HiddenSize, ffn = c.IntermediateSize, d = c.HeadDim;
        var list = new List<(string, long[])> { ("lm_head.weight", [v, h]), ("model.embed_tokens.weight", [v, h]) };
        for (int l = 0; l < c.Layers; l++)
        {
            string p = $"model.layers.{l}.";
            for (int e = 0; e < c.Experts; e++)
            {
                string ep = $"{p}block_sparse_moe.experts.{e}.";
                list.Add((ep + "w1.weight", [ffn, h]));
                list.Add((ep + "w2.weight", [h, ffn]));
                list.Add((ep + "w3.weight", [ffn, h]));
            }
            list.Add((p + "block_sparse_moe.gate.weight", [c.Experts, h]));
            list.Add((p + "input_layernorm.weight", [h]));
            list.Add((p + "post_attention_layernorm.weight", [h]));
            list.Add((p + "self_attn.k_proj.weight", [c.KeyValueHeads * d, h]));
            list.Add((p + "self_attn.o_proj.weight", [h, c.Heads * d]));
            list.Add((p + "self_attn.q_proj.weight", [c.Heads * d, h]));
            list.Add((p + "self_attn.v_proj.weight", [c.KeyValueHeads * d, h]));
        }
        list.Add(("model.norm.weight", [h]));
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
                    CopyInto(target, file, h.Key, h.Block, h.HubShape);
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
            // Other ranks' experts (expert parallel) are the model's tensors too, only not this rank's.
            var whole = HubShapes(model.Config).Select(e => e.Key).ToHashSet(StringComparer.Ordinal);
            // Other pipeline stages' layers are checked by the stages that hold them.
            var mine = model.LayerNumbers.Select(l => $"model.layers.{l}.").ToArray();
            bool OtherStages(string k) => model.Stage.Stages > 1 && k.StartsWith("model.layers.", StringComparison.Ordinal) && !mine.Any(p => k.StartsWith(p, StringComparison.Ordinal));
            var unexpected = byKey.Keys.Where(k => !used.Contains(k) && !whole.Contains(k) && !OtherStages(k) && !k.EndsWith("rotary_emb.inv_freq", StringComparison.Ordinal)).OrderBy(k => k, StringComparer.Ordinal).ToArray();
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

    /// <summary>transformers 5 names: mlp.gate.weight, mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I].</summary>
    private static bool LoadFused(MixtralModel model, HubTensor h, Dictionary<string, SafetensorsFile> byKey, HashSet<string> used)
    {
        var parts = h.Key.Split('.');
        if (parts.Length < 5 || parts[0] != "model" || parts[1] != "layers" || parts[3] != "block_sparse_moe") return false;
        string layerPrefix = $"model.layers.{parts[2]}.mlp.";
        var layer = model.Layers[model.LayerNumbers.ToList().IndexOf(int.Parse(parts[2], System.Globalization.CultureInfo.InvariantCulture))];
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
            // The fused tensor is [E, 2I, H] (gate_up) or [E, H, I] (down); the shard views gate_up as [E, 2, I, H].
            var weight = parts[6] == "w2" ? layer.Moe.ExpertWeights.Down : layer.Moe.ExpertWeights.GateUp;
            var shard = model.ParametersInForwardOrder().Single(p => ReferenceEquals(p.Parameter, weight)).Shard;
            var c = model.Config;
            long[] fusedShape = parts[6] == "w2" ? [c.Experts, c.HiddenSize, c.IntermediateSize] : [c.Experts, 2L * c.IntermediateSize, c.HiddenSize];
            var entry = f.Entry(fused);
            if (!entry.Shape.SequenceEqual(fusedShape))
                throw new UserError($"{f.Path}: tensor '{fused}' has shape [{string.Join(", ", entry.Shape)}] but the model expects [{string.Join(", ", fusedShape)}] from config.json.");
            using var source = f.Map(fused);
            using var mine = shard.Slice(source);   // the shard's view ([E, 2, I, H] for gate_up) of the mapped tensor
            weight.copy_(mine.reshape(weight.shape));
        }
        return true;
    }

    private const string ExpertBiasSuffix = "block_sparse_moe.gate.e_score_correction_bias";

    /// <summary>
    /// Hub keys of the aux-loss-free expert bias of every layer that has one (Router.EnableExpertBias): a routing
    /// buffer, not a parameter, saved under DeepSeek-V3's Hugging Face name (gate.e_score_correction_bias) so a
    /// trained model keeps the routing it learned. Not in <see cref="HubTensors"/>: it has no gradient.
    /// </summary>
    public static IEnumerable<(string Key, DecoderLayer Layer)> ExpertBiasKeys(MixtralModel model) =>
        model.Layers.Select((layer, i) => ($"model.layers.{model.LayerNumbers[i]}.{ExpertBiasSuffix}", layer)).Where(x => x.layer.Moe.ExpertBias is not null);

    /// <summary>
    /// Copies this rank's block (<paramref name="block"/>, null for the whole tensor) of tensor <paramref name="key"/>
    /// into <paramref name="target"/>, reshaped from the hub block shape (<paramref name="hubShape"/>) when the target is
    /// another view of the same elements. The file's shape is checked first: a mismatch names both shapes.
    /// </summary>
    private static void CopyInto(Tensor target, SafetensorsFile file, string key, TensorShard? block = null, long[]? hubShape = null)
    {
        var entry = file.Entry(key);
        long[] expected = block?.GlobalShape ?? hubShape ?? target.shape;
        if (!entry.Shape.SequenceEqual(expected))
            throw new UserError($"{file.Path}: tensor '{key}' has shape [{string.Join(", ", entry.Shape)}] but the model expects [{string.Join(", ", expected)}] from config.json.");
        using var source = file.Map(key);   // zero-copy view of the mapped bytes; copy_ converts dtype and device
        if (!source.is_floating_point())
            throw new UserError($"{file.Path}: tensor '{key}' is {entry.Dtype}; weights must be floating point.");
        using var mine = block is null ? source.alias() : block.Slice(source);   // this rank's block, still a view of the file
        target.copy_(hubShape is null ? mine : mine.reshape(target.shape));
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
            return new KeyValuePair<string, Tensor>(h.Key, h.Read(source.detach()));
        });

    /// <summary>
    /// Saves the model as a Hugging Face checkpoint directory with hub key names: config.json plus
    /// model.safetensors, or — when the weights exceed <paramref name="maxShardBytes"/> — shards
    /// model-0000i-of-0000N.safetensors and model.safetensors.index.json (<c>metadata.total_size</c>,
    /// <c>weight_map</c>), as transformers' save_pretrained writes them. Tensors keep the model's dtype and are
    /// copied to the CPU one at a time; every file is written to a temporary name and renamed when complete.
    /// </summary>
    /// <param name="model">The model to save.</param>
    /// <param name="directory">Created if absent; existing files of the same names are replaced.</param>
    /// <param name="maxShardBytes">Largest shard (transformers' default max_shard_size is 5 GB; a tensor larger than it gets a shard of its own).</param>
    public static void Save(MixtralModel model, string directory, long maxShardBytes = 5_000_000_000)
    {
        if (model.Stage.Stages > 1)
            throw new UserError($"This rank holds pipeline stage {model.Stage.Stage} of {model.Stage.Stages} (some layers only): a Hugging Face folder needs them all; save a distributed checkpoint instead.");
        if (model.Layers.Any(l => l.Moe.Dispatcher.Placement.LocalExperts != model.Config.Experts || l.Moe.Dispatcher.Placement.TensorSize != 1))
            throw new UserError("This rank holds only some experts (expert parallel): a Hugging Face folder needs them all; save a distributed checkpoint instead.");
        var named = Named(model).Concat(ExpertBiasKeys(model).Select(b => new KeyValuePair<string, Tensor>(b.Key, b.Layer.Moe.ExpertBias!.BiasE)));
        var tensors = named.Select(kv => new PendingTensor(kv.Key, kv.Value.dtype, kv.Value.shape, () => kv.Value)).ToList();
        WriteFolder(directory, tensors, HubConfig(model.Config, model.Dtype == ScalarType.BFloat16 ? "bfloat16" : "float32"), maxShardBytes);
    }

    /// <summary>
    /// Writes a Hugging Face model folder: <paramref name="tensors"/> (produced one at a time) as model.safetensors, or —
    /// above <paramref name="maxShardBytes"/> — as shards model-0000i-of-0000N.safetensors with
    /// model.safetensors.index.json, as transformers' save_pretrained writes them; then config.json.
    /// </summary>
    public static void WriteFolder(string directory, IReadOnlyList<PendingTensor> tensors, object config, long maxShardBytes = 5_000_000_000)
    {
        Directory.CreateDirectory(directory);
        var shards = new List<List<PendingTensor>> { new() };
        long shardBytes = 0, totalBytes = 0;
        foreach (var t in tensors)
        {
            long bytes = t.Shape.Aggregate(1L, (a, b) => a * b) * SafetensorsFile.ElementBytes(t.Dtype);
            if (shards[^1].Count > 0 && shardBytes + bytes > maxShardBytes)
            {
                shards.Add(new());
                shardBytes = 0;
            }
            shards[^1].Add(t);
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
                foreach (var t in shards[i]) weightMap[t.Name] = shard;
            }
            var index = new Dictionary<string, object>
            {
                ["metadata"] = new Dictionary<string, long> { ["total_size"] = totalBytes },
                ["weight_map"] = weightMap,
            };
            WriteJson(System.IO.Path.Combine(directory, "model.safetensors.index.json"), index);
        }
        WriteJson(System.IO.Path.Combine(directory, "config.json"), config);
    }

    /// <summary>config.json of a Hugging Face Mixtral folder (transformers' field names) for <paramref name="c"/>, saved in <paramref name="torchDtype"/>.</summary>
    public static Dictionary<string, object?> HubConfig(MixtralConfig c, string torchDtype) => new()
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
        ["torch_dtype"] = torchDtype,
    };

    private static void WriteJson(string path, object value)
    {
        var options = new JsonSerializerOptions { WriteIndented = true, Converters = { new PythonFloatConverter() } };
        File.WriteAllText(path + ".tmp", JsonSerializer.Serialize(value, options));
        File.Move(path + ".tmp", path, overwrite: true);
    }

    /// <summary>
    /// Writes a double as a Python float literal (0 as 0.0, 1000000 as 1000000.0): System.Text.Json writes integral
    /// doubles without a fraction, Python's json reads those as int, and transformers' strictly typed configs refuse
    /// an int for a float field (router_jitter_noise: "expected float, got int").
    /// </summary>
    private sealed class PythonFloatConverter : System.Text.Json.Serialization.JsonConverter<double>
    {
        public override double Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options) => reader.GetDouble();

        public override void Write(Utf8JsonWriter writer, double value, JsonSerializerOptions options)
        {
            if (!double.IsFinite(value))
                throw new InvalidOperationException($"config.json cannot hold the non-finite value {value}.");
            string text = value.ToString("R", System.Globalization.CultureInfo.InvariantCulture);
            writer.WriteRawValue(text.IndexOfAny(['.', 'E', 'e']) >= 0 ? text : text + ".0");
        }
    }
}
