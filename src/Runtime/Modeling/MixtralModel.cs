using Moe.Runtime.Devices;
using Moe.Runtime.MixtureOfExperts;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

// Shapes: B batch, S sequence, T = B·S tokens, H hidden, V vocabulary, E experts, L layers.

/// <summary>One pre-norm decoder layer: x ← x + Attn(RMSNorm(x)); x ← x + MoE(RMSNorm(x)).</summary>
public sealed class DecoderLayer : nn.Module
{
    private readonly Parameter input_layernorm, post_attention_layernorm;
    private readonly Attention self_attn;
    private readonly MoeLayer mlp;
    private readonly double eps;
    private readonly TensorParallel tp;

    /// <param name="c">The config.</param>
    /// <param name="options">Routing, capacity and loss semantics of the MoE layer.</param>
    /// <param name="dtype">Parameter dtype.</param>
    /// <param name="device">Parameter device.</param>
    /// <param name="dispatcher">This rank's experts' dispatcher (null: all experts here).</param>
    /// <param name="tensorParallel">Tensor and sequence parallel (null: none): attention heads split, the residual stream a sequence shard.</param>
    public DecoderLayer(MixtralConfig c, MoeOptions options, ScalarType dtype, Device device, IExpertDispatcher? dispatcher = null, TensorParallel? tensorParallel = null) : base("layer")
    {
        eps = c.RmsNormEps;
        tp = tensorParallel ?? TensorParallel.For(null, c);
        input_layernorm = new Parameter(torch.ones(c.HiddenSize, dtype: dtype, device: device));
        post_attention_layernorm = new Parameter(torch.ones(c.HiddenSize, dtype: dtype, device: device));
        self_attn = new Attention(c, dtype, device, tp.Size);
        mlp = new MoeLayer(c.Experts, c.HiddenSize, c.IntermediateSize, options, dtype, device, dispatcher);
        RegisterComponents();
    }

    public Parameter InputNorm => input_layernorm;
    public Parameter PostAttentionNorm => post_attention_layernorm;
    public Attention SelfAttention => self_attn;
    public MoeLayer Moe => mlp;

    /// <summary>Selective recompute of the MoE layer (Megatron <c>moe</c>): keep its input and rerun it, all-to-all included, in the backward.</summary>
    public bool RecomputeMoe { get; set; }

    /// <remarks>
    /// Runs in its own dispose scope: the intermediate tensors' handles are released when the layer returns, so
    /// autograd alone decides what stays for the backward, as in PyTorch (handles kept until the end of the step
    /// would hold every temporary — RoPE, projections, the weighted expert outputs — through the backward).
    /// </remarks>
    /// <param name="xBSH">The residual stream: [B, S, H], or this rank's [B, S/TP, H] positions under sequence parallel.</param>
    /// <param name="rope">cos/sin tables of the whole sequence.</param>
    /// <param name="mask">Attention mask of the whole sequence, or null for causal.</param>
    public (Tensor HiddenBSH, MoeLayerOutput Moe) Forward(Tensor xBSH, (Tensor, Tensor) rope, Tensor? mask)
    {
        using var scope = torch.NewDisposeScope();
        // Sequence parallel: the attention (column- then row-parallel) sees the whole sequence; the norms and the MoE layer this rank's positions.
        xBSH = xBSH + tp.ReduceScatterSequence(self_attn.Forward(tp.GatherSequence(Kernels.RmsNorm(xBSH, input_layernorm, eps)), rope, mask));
        HostTrace.Mark("attention");
        long b = xBSH.shape[0], s = xBSH.shape[1], h = xBSH.shape[2];
        var normedTH = Kernels.RmsNorm(xBSH, post_attention_layernorm, eps).view(b * s, h);
        var moe = RecomputeMoe ? ActivationRecompute.MoeLayer(mlp, normedTH, (int)b) : mlp.Forward(normedTH, (int)b);
        var outBSH = xBSH + moe.HiddenTH.view(b, s, h);
        scope.MoveToOuter(moe.Tensors().Append(outBSH));
        return (outBSH, moe);
    }
}

/// <summary>Everything a forward pass produced.</summary>
/// <param name="LogitsBSV">Logits (null when the caller asked only for the loss).</param>
/// <param name="LmLoss">Mean next-token cross-entropy over the counted positions (fp32 scalar), or null without labels.</param>
/// <param name="AuxLoss">Load-balancing loss before its coefficient (transformers: over all layers; Megatron: summed over layers).</param>
/// <param name="ZLoss">Router z-loss summed over layers before its coefficient, or null when off.</param>
/// <param name="Layers">Per-layer routing and dispatch, for metrics.</param>
public sealed record ForwardOutput(Tensor? LogitsBSV, Tensor? LmLoss, Tensor AuxLoss, Tensor? ZLoss, IReadOnlyList<MoeLayerOutput> Layers);

/// <summary>
/// Mixtral for causal language modelling, equal to transformers 5.17's MixtralForCausalLM: token
/// embedding, L decoder layers, final RMSNorm, untied LM head. Single-device model code; parallelism
/// is applied from outside.
/// </summary>
public sealed class MixtralModel : nn.Module
{
    private readonly Parameter? embed_tokens, norm, lm_head;
    private readonly ModuleList<DecoderLayer> layers;
    private readonly TensorParallel tp;

    /// <param name="config">The model's config.</param>
    /// <param name="options">Routing, capacity and loss semantics of every MoE layer.</param>
    /// <param name="dtype">Parameter dtype.</param>
    /// <param name="device">Parameter device.</param>
    /// <param name="plan">This rank's cut of the model (its experts and their dispatcher); null for the whole model on one device.</param>
    /// <param name="stage">
    /// The pipeline stage this rank builds (its layers, and the embedding on the first stage, the final norm and LM
    /// head on the last); null for every layer. Parameter names keep the model's layer numbers.
    /// </param>
    public MixtralModel(MixtralConfig config, MoeOptions options, ScalarType dtype, Device device, ParallelPlan? plan = null, PipelineStage? stage = null) : base("model")
    {
        if (config.TieWordEmbeddings)
            throw new UserError("tie_word_embeddings = true is not supported; Mixtral's configs untie the LM head.");
        Config = config;
        Dtype = dtype;
        Plan = plan;
        Stage = stage ?? PipelineStage.Whole(config.Layers);
        LayerNumbers = Stage.Layers.ToArray();
        tp = TensorParallel.For(plan, config);
        long vocab = tp.VocabRange(config.VocabSize).Count;   // vocab-parallel embedding and column-parallel LM head: V / TP rows
        if (Stage.HoldsEmbedding) embed_tokens = new Parameter(torch.empty(vocab, config.HiddenSize, dtype: dtype, device: device));
        layers = new ModuleList<DecoderLayer>(LayerNumbers.Select(_ => new DecoderLayer(config, options, dtype, device, plan?.NewDispatcher(), tp)).ToArray());
        if (Stage.HoldsHead)
        {
            norm = new Parameter(torch.ones(config.HiddenSize, dtype: dtype, device: device));
            lm_head = new Parameter(torch.empty(vocab, config.HiddenSize, dtype: dtype, device: device));
        }
        Device = device;
        RegisterComponents();
    }

    /// <summary>The pipeline stage this model is (the whole model: one stage of every layer).</summary>
    public PipelineStage Stage { get; }

    /// <summary>The model's number of each layer this rank holds, in <see cref="Layers"/> order.</summary>
    public IReadOnlyList<int> LayerNumbers { get; }

    /// <summary>The parameters' device.</summary>
    public Device Device { get; }

    public MixtralConfig Config { get; }

    /// <summary>This rank's cut of the model, or null for the whole model.</summary>
    public ParallelPlan? Plan { get; }

    /// <summary>Tensor-parallel size (1 without a plan).</summary>
    public int TensorSize => Plan?.Groups.Tp.Size ?? 1;

    /// <summary>This rank's index in its tensor-parallel group.</summary>
    public int TensorRank => Plan?.Groups.Tp.Rank ?? 0;

    /// <summary>This rank's tensor and sequence parallelism (the identity at TP 1).</summary>
    public TensorParallel TensorParallel => tp;

    public ScalarType Dtype { get; }

    private RecomputePlan recomputation = RecomputePlan.None;

    /// <summary>
    /// Activation recompute (Megatron's <c>--recompute-*</c>): full chunks of layers, or the core attention and the MoE
    /// layer of every layer. Default none. See <see cref="ActivationRecompute"/>.
    /// </summary>
    public RecomputePlan Recomputation
    {
        get => recomputation;
        set
        {
            recomputation = value;
            foreach (var layer in layers)
            {
                layer.SelfAttention.RecomputeCore = value.CoreAttention;
                layer.RecomputeMoe = value.MoeLayer;
            }
        }
    }

    /// <summary>
    /// Context parallel (set by <see cref="ContextParallel.Apply"/>): the inputs of <see cref="Forward"/> are this
    /// rank's chunks of every sequence (<see cref="ContextParallel.Shard(Tensor)"/>), positions and masks global. Null
    /// or size 1: the inputs are whole sequences.
    /// </summary>
    public ContextParallel? Context { get; set; }

    /// <summary>
    /// Every parameter of this rank in the order the forward first uses it, with its layout-independent name and
    /// its place in the whole tensor (<see cref="TensorShard"/>). The names key initialisation, gradient buffers
    /// and checkpoints; layer numbers are the model's.
    /// </summary>
    public IEnumerable<ModelParameter> ParametersInForwardOrder()
    {
        ModelParameter Whole(string name, Parameter p) => new(name, p, false, TensorShard.Whole(p.shape));
        ModelParameter Split(string name, Parameter p, Func<TensorShard> shard) => tp.Size == 1 ? Whole(name, p) : new(name, p, false, shard());
        long vocab = Config.VocabSize, hidden = Config.HiddenSize;
        if (embed_tokens is not null) yield return Split("model.embed_tokens", embed_tokens, () => tp.VocabShard(vocab, hidden));
        for (int i = 0; i < layers.Count; i++)
        {
            var layer = layers[i];
            string prefix = $"model.layers.{LayerNumbers[i]}.";
            yield return Whole(prefix + "input_layernorm", layer.InputNorm);
            if (tp.KeyValueReplicas > 1)
            {
                // Replicated key-value heads (R017): the rank's query rows and its group's shared key/value rows.
                var pieces = tp.QkvPieces(layer.SelfAttention, Config.Heads, Config.KeyValueHeads, hidden);
                yield return new(prefix + "self_attn.qkv_proj", layer.SelfAttention.Qkv, false, pieces[0].Block, pieces);
            }
            else yield return Split(prefix + "self_attn.qkv_proj", layer.SelfAttention.Qkv, () => tp.QkvShard(layer.SelfAttention, Config.KeyValueHeads, hidden));
            yield return Split(prefix + "self_attn.o_proj", layer.SelfAttention.O, () => tp.OutputShard(layer.SelfAttention, Config.Heads, hidden));
            yield return Whole(prefix + "post_attention_layernorm", layer.PostAttentionNorm);
            yield return Whole(prefix + "mlp.gate", layer.Moe.Gate);
            var place = layer.Moe.Dispatcher.Placement;
            long e = place.TotalExperts, local = place.LocalExperts, h = Config.HiddenSize, ffn = Config.IntermediateSize, slice = ffn / place.TensorSize;
            long first = place.FirstExpert, at = place.TensorRank * slice;
            yield return new(prefix + "mlp.experts.gate_up", layer.Moe.ExpertWeights.GateUp, true,
                new TensorShard([e, 2, ffn, h], [local, 2, slice, h], [first, 0, at, 0]));
            yield return new(prefix + "mlp.experts.down", layer.Moe.ExpertWeights.Down, true,
                new TensorShard([e, h, ffn], [local, h, slice], [first, 0, at]));
        }
        if (norm is not null) yield return Whole("model.norm", norm);
        if (lm_head is not null) yield return Split("lm_head", lm_head, () => tp.VocabShard(vocab, hidden));
    }

    public Parameter Embedding => embed_tokens ?? throw new InvalidOperationException($"Pipeline stage {Stage.Stage} holds no embedding (the first stage does).");
    public Parameter FinalNorm => norm ?? throw new InvalidOperationException($"Pipeline stage {Stage.Stage} holds no final norm (the last stage does).");
    public Parameter LmHead => lm_head ?? throw new InvalidOperationException($"Pipeline stage {Stage.Stage} holds no LM head (the last stage does).");
    public IReadOnlyList<DecoderLayer> Layers => layers.ToList();

    /// <summary>
    /// A randomly initialised model (<see cref="InitializeWeights"/> with the config's initializer_range);
    /// <paramref name="options"/> default to transformers' Mixtral semantics with the config's top-k.
    /// </summary>
    public static MixtralModel Random(MixtralConfig config, long seed, ScalarType dtype, Device device, MoeOptions? options = null)
    {
        var model = new MixtralModel(config, options ?? new MoeOptions { TopK = config.TopK }, dtype, device);
        model.InitializeWeights(seed, config.InitializerRange);
        return model;
    }

    /// <summary>
    /// transformers' initialisation — normal(0, std) for matrices, ones for norms — drawn per parameter and per
    /// expert from generators seeded by name (<see cref="ParameterInit"/>), so every layout holds its block of the
    /// same model.
    /// </summary>
    public void InitializeWeights(long seed, double std = 0.02)
    {
        foreach (var p in ParametersInForwardOrder()) ParameterInit.Fill(p, seed, std);
    }

    /// <summary>
    /// Runs the model. <paramref name="labelsBS"/> are the targets aligned with the inputs (position t predicts
    /// labels[t]); <paramref name="lossMaskBS"/> (1 = counted) defaults to all ones. Use
    /// <see cref="ShiftedLabels"/> for transformers' convention (labels = inputs shifted by one).
    /// </summary>
    /// <param name="inputIdsBS">Token ids, int64 [B, S].</param>
    /// <param name="labelsBS">Targets aligned with the inputs, or null for no loss.</param>
    /// <param name="lossMaskBS">1 where a position counts in lm_loss (default: all).</param>
    /// <param name="positionIdsBS">RoPE positions (default 0…S−1 per row; packed data restarts them per document).</param>
    /// <param name="documentIdsBS">Document of each position: attention stays inside a document (packed sequences).</param>
    /// <param name="returnLogits">False to drop the [B, S, V] logits from the result (training).</param>
    /// <param name="attentionMaskBS">
    /// transformers' 2-D padding mask (1 = token, 0 = padding): padded keys are never attended to, and the
    /// transformers aux loss leaves padded tokens out of both its fractions (load_balancing_loss_func's
    /// masked branch). Megatron's aux losses ignore it (they count every token on the rank).
    /// </param>
    public ForwardOutput Forward(Tensor inputIdsBS, Tensor? labelsBS = null, Tensor? lossMaskBS = null,
        Tensor? positionIdsBS = null, Tensor? documentIdsBS = null, bool returnLogits = true, Tensor? attentionMaskBS = null)
    {
        if (Stage.Stages > 1)
            throw new InvalidOperationException($"Forward runs the whole model; pipeline stage {Stage.Stage} of {Stage.Stages} runs through PipelineRunner.");
        long b = inputIdsBS.shape[0], s = inputIdsBS.shape[1];
        var device = Device;
        var (rope, mask) = AttentionInputs(b, s, positionIdsBS, documentIdsBS, attentionMaskBS);
        var xBSH = Embed(inputIdsBS);
        var moeOutputs = new List<MoeLayerOutput>(layers.Count);
        for (int l = 0; l < layers.Count;)
        {
            if (recomputation.ChunkAt(l) is (int start, int end))
            {
                // Full recompute: the chunk keeps only its input hidden states.
                (xBSH, var chunk) = ActivationRecompute.Layers(Layers, start, end, xBSH, rope, mask);
                moeOutputs.AddRange(chunk);
                l = end;
                continue;
            }
            (xBSH, var moe) = layers[l].Forward(xBSH, rope, mask);
            moeOutputs.Add(moe);
            l++;
        }
        var (logitsBSV, lmLoss) = Head(xBSH, labelsBS, lossMaskBS, returnLogits);
        HostTrace.Mark("lm head + loss");
        var options = layers[0].Moe.Options;
        Tensor aux = options.LoadBalancing == Dsl.LoadBalancing.None
            ? torch.zeros(1, device: device).squeeze()
            : options.AuxLossConvention == AuxLossConvention.Transformers
                ? AuxLosses.Transformers(tp.Size > 1 ? throw new NotSupportedException("transformers' aux loss over all layers is not computed under tensor parallel; training uses Megatron's (per layer, counts summed over TP).") : moeOutputs.Select(m => m.Routing.LogitsTE).ToArray(), Config.Experts, options.TopK, attentionMaskBS?.flatten())
                : moeOutputs.Select((m, l) => layers[l].Moe.MegatronAuxLoss(m, (int)b)).Aggregate((x, y) => x + y);
        HostTrace.Mark("aux loss");
        // Each rank's mean over its own tokens; the loss divides the coefficient by the TP×CP size as Megatron does
        // (MicroBatch.Loss), so the ranks' terms add up to the mean over all tokens.
        Tensor? z = options.ZLoss ? moeOutputs.Select(m => AuxLosses.ZLoss(m.Routing.LogitsTE)).Aggregate((x, y) => x + y) : null;
        return new ForwardOutput(logitsBSV, lmLoss, aux, z, moeOutputs);
    }

    /// <summary>
    /// RoPE tables and the attention mask every layer uses (see <see cref="Forward"/> for the arguments): the
    /// first piece of the forward, which every pipeline stage computes for itself.
    /// </summary>
    public ((Tensor, Tensor) Rope, Tensor? Mask) AttentionInputs(long b, long s, Tensor? positionIdsBS = null, Tensor? documentIdsBS = null, Tensor? attentionMaskBS = null)
    {
        var device = Device;
        var cp = Context is { Size: > 1 } context ? context : null;
        positionIdsBS ??= (cp is null ? torch.arange(s, device: device) : torch.tensor(cp.LocalIndices(checked((int)s * cp.Size)), device: device)).unsqueeze(0).expand(b, s);
        var rope = Rotary.Tables(positionIdsBS, Config.HeadDim, Config.RopeTheta, Dtype);
        var mask = cp is not null ? cp.AttentionMask(s, documentIdsBS, Config.SlidingWindow, device)
            : documentIdsBS is null ? null : DocumentCausalMask(documentIdsBS);
        if (cp is not null && attentionMaskBS is not null)
            throw new InvalidOperationException("A padding mask (attentionMaskBS) is not supported under context parallelism; training packs sequences and passes none.");
        if (cp is null && Config.SlidingWindow is int window && s > window)
        {
            // transformers' sliding-window causal mask: query i sees keys j with i − window < j ≤ i.
            var slidingSS = SlidingWindowCausalMask(s, window, device);
            mask = mask is null ? slidingSS.unsqueeze(0).unsqueeze(0) : mask & slidingSS;
        }
        if (attentionMaskBS is not null)
        {
            // Causal ∧ key is a real token, [B, 1, S, S]. A padding query with no real key before it (left
            // padding) would have an empty row — NaN or 0 depending on the kernel, and a NaN would reach real
            // tokens through V and the aux loss — so every position may always see itself; real tokens
            // already do, so their outputs are unchanged.
            var keysB11S = attentionMaskBS.gt(0).view(b, 1, 1, s);
            var selfSS = torch.eye(s, dtype: ScalarType.Bool, device: device);
            mask = ((mask ?? torch.ones(s, s, dtype: ScalarType.Bool, device: device).tril().view(1, 1, s, s)) & keysB11S) | selfSS;
        }
        return (rope, mask);
    }

    /// <summary>The token embedding [B, S, H] of <paramref name="inputIdsBS"/> (the first stage's piece).</summary>
    public Tensor Embed(Tensor inputIdsBS)
    {
        // Under sequence parallel the residual stream holds this rank's S/TP positions from here to the final norm.
        var xBSH = tp.Embed(Embedding, inputIdsBS);
        HostTrace.Mark("embedding");
        return xBSH;
    }

    /// <summary>
    /// Final norm, LM head and the mean cross-entropy over the counted positions (the last stage's piece; see
    /// <see cref="Forward"/>). Logits only when <paramref name="returnLogits"/>; the loss only with labels.
    /// </summary>
    public (Tensor? LogitsBSV, Tensor? LmLoss) Head(Tensor xBSH, Tensor? labelsBS, Tensor? lossMaskBS, bool returnLogits)
    {
        Tensor? logitsBSV, lmLoss = null;
        using (var head = torch.NewDisposeScope())
        {
            // Its own scope, like the layers': without logits asked for, the bf16 logits and their fp32 copy are
            // released here (cross-entropy keeps only its log-probabilities for the backward).
            logitsBSV = nn.functional.linear(tp.GatherSequence(Kernels.RmsNorm(xBSH, FinalNorm, Config.RmsNormEps)), LmHead);   // [B, S, V/TP]
            HostTrace.Mark("lm head");
            if (labelsBS is not null)
            {
                // Positions outside the loss mask become ignore_index, so the fused mean counts only the rest.
                // (masked_fill takes the scalar as a kernel argument; torch.where with a long made a tensor of it and
                // blocked the host until the GPU had caught up: 11 ms a step, bench MOE_HOST_TRACE=1.)
                var targets = lossMaskBS is null ? labelsBS.flatten() : labelsBS.flatten().masked_fill(lossMaskBS.flatten().le(0), IgnoreIndex);
                HostTrace.Mark("targets");
                // [B·S, V/TP]: under sequence parallel xBSH held S/TP positions, the gathered logits hold all S.
                var logitsF = logitsBSV.view(logitsBSV.shape[0] * logitsBSV.shape[1], logitsBSV.shape[2]).to(ScalarType.Float32);
                HostTrace.Mark("fp32 logits");
                lmLoss = head.MoveToOuter(tp.CrossEntropy(logitsF, targets, IgnoreIndex));
                HostTrace.Mark("cross-entropy");
            }
            logitsBSV = returnLogits ? head.MoveToOuter(tp.GatherVocabulary(logitsBSV)) : null;
        }
        return (logitsBSV, lmLoss);
    }

    /// <summary>
    /// Starts a new global batch for <see cref="Dsl.LoadBalancing.GlobalAuxLoss"/>: clears every layer's
    /// running routed counts. Call after each optimizer step (Megatron's reset_global_aux_loss_tracker).
    /// </summary>
    public void ResetGlobalAuxLoss()
    {
        foreach (var l in layers) l.Moe.GlobalAuxLoss.Reset();
    }

    /// <summary>
    /// Aux-loss-free load balancing (<see cref="MoeOptions.ExpertBias"/>): moves every layer's expert bias by
    /// the (token, expert) pairs it routed since the last call, b += rate · sign(mean count − count), and zeroes
    /// the counts. Call once per global batch, after the optimizer step (Megatron does it in
    /// finalize_model_grads). Does nothing when the expert bias is off.
    /// </summary>
    public void UpdateExpertBias()
    {
        foreach (var l in layers) l.Moe.UpdateExpertBias();
    }

    private const long IgnoreIndex = -100;

    /// <summary>transformers' labels: position t predicts input t+1; the last position is not counted.</summary>
    public static (Tensor Labels, Tensor LossMask) ShiftedLabels(Tensor inputIdsBS)
    {
        long b = inputIdsBS.shape[0], s = inputIdsBS.shape[1];
        var labels = torch.cat(new[] { inputIdsBS.narrow(1, 1, s - 1), torch.zeros(b, 1, dtype: ScalarType.Int64, device: inputIdsBS.device) }, 1);
        var mask = torch.ones(b, s, device: inputIdsBS.device);
        mask[.., ^1] = torch.zeros(b, device: inputIdsBS.device);
        return (labels, mask);
    }

    /// <summary>Sliding-window causal mask [S, S] (true = attend): i − window &lt; j ≤ i (transformers sliding_window_causal_mask_function).</summary>
    public static Tensor SlidingWindowCausalMask(long s, int window, Device? device = null)
    {
        var i = torch.arange(s, device: device).unsqueeze(1);
        var j = torch.arange(s, device: device).unsqueeze(0);
        return j.le(i) & j.gt(i - window);
    }

    /// <summary>Document-causal mask [B, 1, S, S]: position i attends to j ≤ i of the same document.</summary>
    public static Tensor DocumentCausalMask(Tensor documentIdsBS)
    {
        long s = documentIdsBS.shape[1];
        var causal = torch.ones(s, s, dtype: ScalarType.Bool, device: documentIdsBS.device).tril();
        var same = documentIdsBS.unsqueeze(2).eq(documentIdsBS.unsqueeze(1));
        return (same & causal).unsqueeze(1);
    }
}
