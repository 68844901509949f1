using Moe.Dsl;
using Moe.Runtime.MixtureOfExperts;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

// Shape legend
//   B batch   S sequence   T = B·S tokens   H hidden   E experts   N heads   d head dim

/// <summary>
/// Which parts of the model run without keeping their activations (Megatron's <c>--recompute-*</c> flags, resolved
/// for this model's layers): whole layers grouped in chunks (full), or the attention core and the MoE layer of every
/// layer (selective).
/// </summary>
/// <param name="Chunks">Full recompute: the ranges [Start, End) of indices into the stage's layer list recomputed as one unit each; empty otherwise.</param>
/// <param name="CoreAttention">Selective <c>core_attn</c>: softmax(QKᵀ/√d)·V keeps only q, k, v.</param>
/// <param name="MoeLayer">Selective <c>moe</c>: the MoE layer (router, dispatch with its all-to-all, experts, combine) keeps only its input.</param>
public sealed record RecomputePlan(IReadOnlyList<(int Start, int End)> Chunks, bool CoreAttention, bool MoeLayer)
{
    /// <summary>Nothing recomputed.</summary>
    public static RecomputePlan None { get; } = new(Array.Empty<(int, int)>(), false, false);

    /// <summary>Whether anything is recomputed.</summary>
    public bool Any => Chunks.Count > 0 || CoreAttention || MoeLayer;

    /// <summary>The plan for a model of <paramref name="layers"/> layers on one device (see <see cref="For(Dsl.Recompute, PipelineStage)"/>).</summary>
    public static RecomputePlan For(Dsl.Recompute r, int layers) => For(r, PipelineStage.Whole(layers));

    /// <summary>
    /// The plan for the layers of <paramref name="stage"/> as Megatron's <c>TransformerBlock._checkpointed_forward</c>
    /// chooses them. Megatron builds one block per model chunk (the stage's layers, or under a virtual pipeline each
    /// chunk's), and each block applies the method to its own layers from its first: uniform cuts them into chunks of
    /// NumLayers (the last may be shorter: <c>min(layer + n, layers of the block)</c>); block recomputes the first
    /// NumLayers of them one by one (all of them when the block has fewer). The chunks are indices into the stage's
    /// layer list (<see cref="MixtralModel.Layers"/>), so none spans two model chunks. NumLayers is bounded by the
    /// largest stage's layers, Megatron's <c>num_layers_per_pipeline_rank</c>. <c>moe_act</c> needs nothing: the
    /// grouped experts always recompute SwiGLU. A setting the rule set refuses (MOE0302–MOE0304) is refused here too,
    /// with the rule's ID.
    /// </summary>
    public static RecomputePlan For(Dsl.Recompute r, PipelineStage stage)
    {
        switch (r.Granularity)
        {
            case RecomputeGranularity.None:
                if (r.Method is not null || r.NumLayers is not null)
                    throw new UserError("Recompute: a method or number of layers needs --recompute-granularity full (rule MOE0303).");
                return None;
            case RecomputeGranularity.Full:
                int most = stage.LargestStageLayers;
                if (r.Method is not RecomputeMethod method || r.NumLayers is not int n || n < 1 || n > most)
                    throw new UserError($"Recompute: full recompute needs --recompute-method uniform|block and --recompute-num-layers between 1 and {most}, " +
                        (stage.Stages > 1 ? $"the layers of the largest of the {stage.Stages} pipeline stages" : "the model's layers") +
                        $"{(r.NumLayers is int given ? $" (got {given})" : "")} (rule MOE0302).");
                var chunks = new List<(int, int)>();
                int offset = 0;
                foreach (var modelChunk in stage.Chunks)
                {
                    int count = modelChunk.Count;
                    if (method == RecomputeMethod.Uniform)
                        for (int start = 0; start < count; start += n) chunks.Add((offset + start, offset + Math.Min(start + n, count)));
                    else
                        for (int l = 0; l < Math.Min(n, count); l++) chunks.Add((offset + l, offset + l + 1));
                    offset += count;
                }
                return new RecomputePlan(chunks, false, false);
            case RecomputeGranularity.Selective:
                if (r.Method is not null || r.NumLayers is not null)
                    throw new UserError("Recompute: selective recompute takes no --recompute-method or --recompute-num-layers (rule MOE0303).");
                if ((r.Modules & (RecomputeModules.Layernorm | RecomputeModules.Mlp)) != 0)
                    throw new UserError($"Recompute: modules {r.Modules & (RecomputeModules.Layernorm | RecomputeModules.Mlp)} are not supported; valid: core_attn, moe_act, moe (rule MOE0304).");
                return new RecomputePlan(Array.Empty<(int, int)>(), (r.Modules & RecomputeModules.CoreAttn) != 0, (r.Modules & RecomputeModules.Moe) != 0);
            default:
                throw new ArgumentOutOfRangeException(nameof(r), r.Granularity, "unknown recompute granularity");
        }
    }

    /// <summary>The chunk that starts at <paramref name="layer"/>, if full recompute covers it.</summary>
    public (int Start, int End)? ChunkAt(int layer)
    {
        foreach (var c in Chunks) if (c.Start == layer) return c;
        return null;
    }
}

/// <summary>
/// Activation recompute: a region of the forward runs without autograd, only its inputs are kept, and in the backward
/// it runs again with autograd and is differentiated there (Chen et al. 2016, "Training Deep Nets with Sublinear
/// Memory Cost", arXiv:1604.06174; Megatron-Core <c>tensor_parallel.random.CheckpointFunction</c>). The gradients are
/// those of the same computation run once with autograd: bit-equal on the CPU (tests/…/RecomputeTests.cs).
/// </summary>
/// <remarks>
/// <para>
/// Randomness: nothing random runs in the forward — Mixtral's attention dropout is 0 and router jitter is 0, and
/// configs with either are refused (<see cref="MixtralConfig"/>) — so, unlike Megatron's CheckpointFunction, no RNG
/// state is saved and restored around the rerun.
/// </para>
/// <para>
/// Collectives: a recomputed MoE layer reruns its dispatcher's all-gather of counts and its all-to-alls in the
/// backward, as Megatron's <c>moe</c> recompute does (the checkpoint wraps route, dispatch, experts and combine).
/// Every rank runs the same layers and so reaches each rerun at the same point of its backward, in the same layer
/// order: the collectives pair up as in the forward. Under pipelining the ranks of one stage share its schedule, so
/// they rerun the same units of the same micro-batches in the same order too.
/// </para>
/// <para>
/// Side effects run once: the expert-bias token counts are taken only with gradients enabled (so in the rerun, not
/// in the first pass, as in Megatron, whose checkpointed forward also runs under no_grad); the aux losses are
/// computed outside the region from the router outputs the region returns.
/// </para>
/// <para>
/// Memory: the region's outputs are the checkpoint node's outputs, and TorchSharp keeps an empty tensor the size of
/// each output of a managed autograd function (Node.SaveOutputsInfo, to materialise a missing gradient) until the
/// node is freed; a recomputed layer therefore holds its input and one more hidden-sized buffer.
/// </para>
/// </remarks>
public static class ActivationRecompute
{
    /// <summary>
    /// Runs <paramref name="region"/> on <paramref name="inputs"/> without keeping its activations; returns its outputs,
    /// attached to autograd through one node that reruns the region in the backward. The region must be a pure
    /// function of its inputs and the model's parameters (it runs twice) and return floating-point outputs.
    /// </summary>
    public static Tensor[] Checkpoint(string name, Func<Tensor[], Tensor[]> region, params Tensor[] inputs)
    {
        // Without autograd (evaluation) there is nothing to keep: run the region as it is.
        if (!torch.is_grad_enabled()) return region(inputs);
        ManagedBackward.BeforeForward();
        var args = new object[inputs.Length + 1];
        args[0] = new Region(name, region);
        for (int i = 0; i < inputs.Length; i++) args[i + 1] = inputs[i];
        return CheckpointFunction.apply(args).ToArray();
    }

    /// <summary>
    /// Decoder layers [start, end) as one recomputed unit (full recompute): keeps only the chunk's input hidden states.
    /// Returns the chunk's output and, per layer, what the losses and metrics need — the router's logits and scores
    /// (outputs of the checkpoint, so the aux and z losses reach the router) and the routing counts. The row buffers
    /// and expert outputs of the first pass are released at once (not kept for metrics).
    /// </summary>
    public static (Tensor HiddenBSH, List<MoeLayerOutput> Layers) Layers(IReadOnlyList<DecoderLayer> layers, int start, int end,
        Tensor xBSH, (Tensor Cos, Tensor Sin) rope, Tensor? mask)
    {
        var first = new List<MoeLayerOutput>();
        bool firstPass = true;
        Tensor[] Region(Tensor[] inputs)
        {
            // Its own scope: the hidden states between the chunk's layers go when the chunk is done.
            using var scope = torch.NewDisposeScope();
            var x = inputs[0];
            var outputs = new List<Tensor>();
            var moes = new List<MoeLayerOutput>();
            for (int l = start; l < end; l++)
            {
                (x, var moe) = layers[l].Forward(x, (inputs[1], inputs[2]), inputs.Length > 3 ? inputs[3] : null);
                moes.Add(moe);
            }
            outputs.Add(x);
            foreach (var moe in moes) { outputs.Add(moe.Routing.LogitsTE); outputs.Add(moe.Routing.ScoresTE); }
            scope.MoveToOuter(outputs);
            if (firstPass)
            {
                first.AddRange(moes);
                scope.MoveToOuter(moes.SelectMany(m => m.Tensors()).Where(t => !outputs.Contains(t)));
            }
            firstPass = false;
            return outputs.ToArray();
        }
        var inputs = mask is null ? new[] { xBSH, rope.Cos, rope.Sin } : new[] { xBSH, rope.Cos, rope.Sin, mask };
        var outs = Checkpoint($"layers {start}..{end - 1}", Region, inputs);
        var result = first.Select((moe, i) => Slim(moe, outs[1 + 2 * i], outs[2 + 2 * i], null)).ToList();
        return (outs[0], result);
    }

    /// <summary>
    /// The MoE layer as a recomputed unit (selective <c>moe</c>): keeps only its input [T, H]; returns its output, with
    /// the router's logits and scores as checkpoint outputs and the routing counts of the first pass.
    /// </summary>
    public static MoeLayerOutput MoeLayer(MoeLayer layer, Tensor hiddenTH, int sequences)
    {
        MoeLayerOutput? first = null;
        Tensor[] Region(Tensor[] inputs)
        {
            var moe = layer.Forward(inputs[0], sequences);
            first ??= moe;
            return [moe.HiddenTH, moe.Routing.LogitsTE, moe.Routing.ScoresTE];
        }
        var outs = Checkpoint("moe", Region, hiddenTH);
        return Slim(first!, outs[1], outs[2], outs[0]);
    }

    /// <summary>Selective <c>core_attn</c>: softmax(QKᵀ/√d)·V [B, N, S, d] keeping only q, k, v (and the mask).</summary>
    public static Tensor CoreAttention(Func<Tensor, Tensor, Tensor, Tensor?, Tensor> attention, Tensor qBNSd, Tensor kBNSd, Tensor vBNSd, Tensor? maskB1SS)
    {
        Tensor[] Region(Tensor[] i) => [attention(i[0], i[1], i[2], i.Length > 3 ? i[3] : null)];
        var inputs = maskB1SS is null ? new[] { qBNSd, kBNSd, vBNSd } : new[] { qBNSd, kBNSd, vBNSd, maskB1SS };
        return Checkpoint("core_attn", Region, inputs)[0];
    }

    /// <summary>
    /// The first pass's layer output without its large buffers (rows, expert outputs: released now, recomputed in the
    /// backward), with the router logits and scores that carry gradients, and <paramref name="hiddenTH"/> as the output
    /// (an empty [0, H] tensor when the layer's own output is not returned, inside a recomputed chunk).
    /// </summary>
    private static MoeLayerOutput Slim(MoeLayerOutput moe, Tensor logitsTE, Tensor scoresTE, Tensor? hiddenTH)
    {
        var d = moe.Dispatch;
        long h = d.RowsRH.shape[1];
        Tensor Empty(Tensor like) => torch.empty(like.dim() == 2 ? new long[] { 0, like.shape[1] } : new long[] { 0 }, dtype: like.dtype, device: like.device);
        var slim = new MoeLayerOutput(
            hiddenTH ?? torch.empty(0, h, dtype: moe.HiddenTH.dtype, device: moe.HiddenTH.device),
            moe.Routing with { LogitsTE = logitsTE, ScoresTE = scoresTE },
            d with { RowsRH = Empty(d.RowsRH), TokenOfRowR = Empty(d.TokenOfRowR), WeightOfRowR = Empty(d.WeightOfRowR) });
        d.RowsRH.Dispose();
        d.TokenOfRowR.Dispose();
        d.WeightOfRowR.Dispose();
        moe.HiddenTH.Dispose();
        if (!ReferenceEquals(moe.Routing.LogitsTE, logitsTE)) moe.Routing.LogitsTE.Dispose();
        if (!ReferenceEquals(moe.Routing.ScoresTE, scoresTE)) moe.Routing.ScoresTE.Dispose();
        return slim;
    }

    private sealed record Region(string Name, Func<Tensor[], Tensor[]> Run);

    /// <summary>
    /// The autograd node: forward runs the region (autograd is off inside a function's forward) and saves its inputs;
    /// backward reruns it with autograd on detached copies of the inputs, back-propagates the output gradients that
    /// arrived (parameters accumulate their gradients as in a plain backward) and returns the inputs' gradients.
    /// </summary>
    private sealed class CheckpointFunction : torch.autograd.MultiTensorFunction<CheckpointFunction>
    {
        public override string Name => "Recompute";

        public override List<Tensor> forward(torch.autograd.AutogradContext ctx, params object[] vars)
        {
            var region = (Region)vars[0];
            var inputs = vars.Skip(1).Cast<Tensor>().ToArray();
            var outputs = region.Run(inputs);
            ctx.save_for_backward(inputs.ToList());
            ctx.save_data("region", region);
            ctx.save_data("needs", inputs.Select(t => t.requires_grad).ToArray());
            // An output whose gradient never arrives (say the scores when only the z-loss reads the logits) is left
            // out of the rerun's backward rather than given zeros.
            ctx.set_materialize_grads(false);
            return outputs.ToList();
        }

        public override List<Tensor> backward(torch.autograd.AutogradContext ctx, List<Tensor> gradOutputs)
        {
            var region = (Region)ctx.get_data("region");
            var needs = (bool[])ctx.get_data("needs");
            return ManagedBackward.RunMany($"recompute of {region.Name}", needs.Length + 1, ctx, gradOutputs, (saved, grads) =>
            {
                var detached = saved.Select((t, i) => needs[i] ? t.detach().requires_grad_(true) : t.detach()).ToArray();
                Tensor[] outputs;
                using (torch.enable_grad()) outputs = region.Run(detached);
                var pairs = outputs.Zip(grads).Where(p => p.Second is not null && !p.Second.IsInvalid && p.First.requires_grad).ToList();
                if (pairs.Count > 0)
                    torch.autograd.backward(pairs.Select(p => p.First).ToList(), pairs.Select(p => p.Second).ToList());
                var result = new List<Tensor> { null! };
                for (int i = 0; i < detached.Length; i++)
                {
                    var g = needs[i] ? detached[i].grad : null;
                    result.Add(g is null ? null! : ManagedBackward.Keep(g));
                }
                return result;
            });
        }
    }
}
