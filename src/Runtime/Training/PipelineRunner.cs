using Moe.Runtime.Distributed;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Training;

// Shapes: B micro-batch, S sequence, H hidden, L layers of the model, E experts.

/// <summary>One micro-batch's inputs (every stage reads them: positions and masks are needed by every layer).</summary>
/// <param name="TokensBS">Input ids [B, S] (this rank's positions under context parallel).</param>
/// <param name="LabelsBS">Next-token labels [B, S].</param>
/// <param name="LossMaskBS">Positions the loss counts [B, S].</param>
/// <param name="PositionIdsBS">Global position ids [B, S].</param>
/// <param name="DocumentIdsBS">Document ids [B, S] for the reset attention mask, or null.</param>
/// <param name="LmFactor">
/// What the last stage multiplies the micro-batch's mean cross-entropy by before the backward: 1, or under context
/// parallel this rank's share of the whole sequence's counted positions times CP (<see cref="ContextParallel.LossFactor"/>).
/// </param>
/// <param name="NoneCounted">No position of this rank's tokens counts (context parallel): its mean is NaN and weighs nothing.</param>
public sealed record MicroBatchInputs(Tensor TokensBS, Tensor LabelsBS, Tensor LossMaskBS, Tensor PositionIdsBS, Tensor? DocumentIdsBS,
    double LmFactor = 1.0, bool NoneCounted = false);

/// <summary>
/// Runs one step of a pipeline stage: the forwards and backwards of <see cref="PipelineSchedules"/> in order,
/// activations sent to the next virtual stage and gradients to the previous one over the pp group
/// (<see cref="Communicator.Exchange"/>), as Megatron-Core's schedules and p2p_communication do.
/// </summary>
/// <remarks>
/// <para>
/// Communication. Between two actions a stage makes one exchange: the sends of the action just done and the
/// receives the next action needs (Megatron's send_forward_recv_backward and send_backward_recv_forward),
/// so on NCCL a send and the receive it waits behind are one group. Messages between two ranks are received in
/// the order they were sent: every stage knows every other stage's schedule, so a receiver takes what its peer
/// sent in the peer's order and keeps those it needs later (with pp = 2 and a virtual pipeline, activations and
/// gradients share both directions). Every receive waits under the group's deadline.
/// </para>
/// <para>
/// Losses. The last virtual stage's loss is the micro-batch's mean cross-entropy / M. Each layer's aux and
/// z losses (with their coefficients) are attached to the layer's output by <see cref="AuxLossScaler"/> with
/// scale 1/M (Megatron: loss_scale / num_microbatches), so they reach the gradient on the stage that holds the
/// layer. Mixtral's embeddings are untied, so there is no embedding gradient to exchange between the first and
/// last stage (the model refuses tie_word_embeddings).
/// </para>
/// <para>
/// Full recompute. The model's <see cref="RecomputePlan"/> cuts each model chunk's layers into units (Megatron's
/// TransformerBlock._checkpointed_forward per chunk); a unit keeps only its input hidden states and reruns in the
/// backward of its micro-batch (<see cref="ActivationRecompute.Layers"/>). Its layers' aux and z losses, computed from
/// the router outputs the unit returns, are attached to the unit's output in layer order, which gives them the same
/// gradient as attaching each to its own layer's output. Evaluation (forward only) runs the layers as they are.
/// </para>
/// </remarks>
public sealed class PipelineRunner
{
    private readonly MixtralModel _model;
    private readonly PipelineStage _stage;
    private readonly Communicator _pp;
    private readonly MoeOptions _options;
    private readonly double _auxCoeff, _zCoeff;

    /// <param name="model">This stage's model.</param>
    /// <param name="pp">The pipeline group (member i is stage i).</param>
    /// <param name="auxCoeff">Load-balancing loss coefficient (0 when off).</param>
    /// <param name="zCoeff">Router z-loss coefficient (0 when off).</param>
    public PipelineRunner(MixtralModel model, Communicator pp, double auxCoeff, double zCoeff)
    {
        _model = model;
        _stage = model.Stage;
        _pp = pp;
        if (pp.Size != _stage.Stages || pp.Rank != _stage.Stage)
            throw new InvalidOperationException($"{pp.Describe()}: member {pp.Rank} of {pp.Size} runs pipeline stage {_stage.Stage} of {_stage.Stages}.");
        _options = model.Layers[0].Moe.Options;
        if (_options.LoadBalancing != Dsl.LoadBalancing.None && _options.AuxLossConvention == AuxLossConvention.Transformers)
            throw new UserError("Pipeline parallelism needs Megatron's aux-loss convention (a loss per layer); transformers' aux loss pools every layer's router logits into one loss.");
        _auxCoeff = auxCoeff;
        _zCoeff = zCoeff;
    }

    /// <summary>
    /// One step: the schedule's forwards and backwards over <paramref name="microBatches"/> micro-batches (or only the
    /// forwards). <paramref name="sums"/> (fp64 [6 + 2·L·E], laid out as the trainer's) receives this stage's share:
    /// the LM loss terms on the last stage, each own layer's aux, z and token counts; summed over pp they are the
    /// one-device numbers.
    /// </summary>
    /// <param name="input">Micro-batch m's inputs (called once per micro-batch and chunk that needs them).</param>
    /// <param name="microBatches">M.</param>
    /// <param name="sums">The step's metric sums.</param>
    /// <param name="forwardOnly">Evaluation: no backward, no aux losses attached.</param>
    /// <param name="afterBackward">Called after each backward (gradient-buffer accumulation).</param>
    /// <param name="beforeLastBackward">
    /// Called before each model chunk's last backward of the step, in which that chunk's layers receive their last
    /// gradient (<see cref="GradientBuffer.BeginLastMicroBatch"/>); without a virtual pipeline, once, before the stage's
    /// last backward.
    /// </param>
    public void Step(Func<int, MicroBatchInputs> input, int microBatches, Tensor sums, bool forwardOnly = false, Action? afterBackward = null,
        Action? beforeLastBackward = null)
    {
        int pp = _stage.Stages, chunks = _stage.ChunkCount;
        var read = new Dictionary<int, MicroBatchInputs>();
        var uncached = input;
        input = m => read.TryGetValue(m, out var x) ? x : read[m] = uncached(m);
        var schedules = Enumerable.Range(0, pp).Select(s => PipelineSchedules.For(pp, s, microBatches, chunks, forwardOnly)).ToArray();
        var mine = schedules[_stage.Stage];
        // Each chunk's last backward of the step: its layers' parameters get their last gradient there.
        var lastBackwardOf = new Dictionary<int, int>();
        for (int i = 0; i < mine.Count; i++)
            if (mine[i].Backward) lastBackwardOf[mine[i].Chunk] = i;
        var first = input(0);
        // Under sequence parallel the residual stream between stages holds this tensor rank's S / TP positions.
        var channel = new Channel(_pp, _stage, schedules, [first.TokensBS.shape[0], first.TokensBS.shape[1] / _model.TensorParallel.Size, _model.Config.HiddenSize]);
        var live = new Dictionary<(int MicroBatch, int Chunk), Live>();
        try
        {
            channel.Flush([], mine[0], _model.Dtype, _model.Device);
            for (int i = 0; i < mine.Count; i++)
            {
                var a = mine[i];
                var sends = new List<PeerTransfer>();
                if (!a.Backward)
                {
                    var l = Forward(a, input(a.MicroBatch), microBatches, sums, forwardOnly, channel);
                    if (!_stage.IsLastVirtual(a.Chunk)) sends.Add(channel.SendTo(_stage.VirtualStage(a.Chunk) + 1, l.Output.detach()));
                    if (forwardOnly) l.Dispose();
                    else live[(a.MicroBatch, a.Chunk)] = l;
                }
                else
                {
                    using var l = live[(a.MicroBatch, a.Chunk)];
                    live.Remove((a.MicroBatch, a.Chunk));
                    if (lastBackwardOf[a.Chunk] == i) beforeLastBackward?.Invoke();
                    if (_stage.IsLastVirtual(a.Chunk)) l.Output.backward();
                    else
                    {
                        using var grad = channel.Take(Message.Gradient(a.MicroBatch, _stage.VirtualStage(a.Chunk)));
                        torch.autograd.backward([l.Output], [grad]);
                    }
                    ManagedBackward.Complete();
                    afterBackward?.Invoke();
                    if (!_stage.IsFirstVirtual(a.Chunk))
                        sends.Add(channel.SendTo(_stage.VirtualStage(a.Chunk) - 1, l.Input!.grad ?? throw new InvalidOperationException($"Stage {_stage.Stage}: no input gradient for micro-batch {a.MicroBatch}, chunk {a.Chunk}.")));
                }
                channel.Flush(sends, i + 1 < mine.Count ? mine[i + 1] : null, _model.Dtype, _model.Device);
            }
        }
        finally
        {
            foreach (var l in live.Values) l.Dispose();
            channel.Dispose();
        }
    }

    /// <summary>The forward of one micro-batch through one chunk; its output (the loss / M on the last virtual stage) and input are kept for the backward.</summary>
    private Live Forward(PipelineAction a, MicroBatchInputs m, int microBatches, Tensor sums, bool forwardOnly, Channel channel)
    {
        using var scope = torch.NewDisposeScope();
        long b = m.TokensBS.shape[0], s = m.TokensBS.shape[1];
        Tensor? input = null;
        Tensor xBSH;
        if (_stage.IsFirstVirtual(a.Chunk)) xBSH = _model.Embed(m.TokensBS);
        else
        {
            input = channel.Take(Message.Activation(a.MicroBatch, _stage.VirtualStage(a.Chunk)));
            if (!forwardOnly) input.requires_grad_(true);
            xBSH = input;
        }
        var (rope, mask) = _model.AttentionInputs(b, s, m.PositionIdsBS, m.DocumentIdsBS);
        int layers = _model.Config.Layers, experts = _model.Config.Experts;
        // Megatron's aux-loss scale: loss_scale · CP / M (dense gradients are averaged over dp × cp).
        double scale = (double)(_model.Context?.Size ?? 1) / microBatches;
        var recompute = _model.Recomputation;
        var chunkLayers = _stage.LocalLayersOf(a.Chunk).ToArray();
        for (int i = 0; i < chunkLayers.Length;)
        {
            int local = chunkLayers[i];
            if (!forwardOnly && recompute.ChunkAt(local) is (int start, int end))
            {
                if (end - start > chunkLayers.Length - i)
                    throw new InvalidOperationException($"Pipeline stage {_stage.Stage}: the recomputed layers {start}..{end - 1} cross the end of model chunk {a.Chunk} (its layers end at {chunkLayers[^1]}).");
                // Full recompute: layers [start, end) of this model chunk keep only their input hidden states and rerun
                // in the backward; their aux and z losses are attached to the recomputed unit's output, in layer order.
                (xBSH, var moes) = ActivationRecompute.Layers(_model.Layers, start, end, xBSH, rope, mask);
                for (int l = start; l < end; l++) xBSH = Account(l, moes[l - start], xBSH);
                i += end - start;
                continue;
            }
            (xBSH, var moe) = _model.Layers[local].Forward(xBSH, rope, mask);
            xBSH = Account(local, moe, xBSH);
            i++;
        }

        // A layer's losses and metrics: its aux and z losses attached to the residual stream (Megatron's aux-loss scaler),
        // its aux, z and token counts added to the sums.
        Tensor Account(int local, MoeLayerOutput moe, Tensor outBSH)
        {
            var layer = _model.Layers[local];
            Tensor? aux = _options.LoadBalancing == Dsl.LoadBalancing.None ? null : layer.Moe.MegatronAuxLoss(moe, (int)b);
            Tensor? z = _options.ZLoss ? AuxLosses.ZLoss(moe.Routing.LogitsTE) : null;
            if (!forwardOnly && (aux is not null && _auxCoeff != 0 || z is not null && _zCoeff != 0))
            {
                var attached = (aux is null ? 0 : _auxCoeff * aux) + (z is null ? 0 : _zCoeff * z);
                outBSH = AuxLossScaler.Apply(outBSH, attached!, scale);
            }
            using (torch.no_grad())
            {
                int at = _model.LayerNumbers[local] * experts;
                var kept = moe.TokensPerExpert.to(ScalarType.Float64);
                var routed = moe.RoutedPerExpert.to(ScalarType.Float64);
                if (aux is not null) sums[2].add_(aux.detach().to(ScalarType.Float64) / microBatches);
                if (z is not null) sums[3].add_(z.detach().to(ScalarType.Float64) / microBatches);
                sums[4].add_(routed.sum());
                sums[5].add_(kept.sum());
                sums.narrow(0, 6 + at, experts).add_(kept);
                sums.narrow(0, 6 + layers * experts + at, experts).add_(routed);
            }
            return outBSH;
        }
        Tensor output;
        if (_stage.IsLastVirtual(a.Chunk))
        {
            var (_, lm) = _model.Head(xBSH, m.LabelsBS, m.LossMaskBS, returnLogits: false);
            using (torch.no_grad())
            {
                var counted = m.LossMaskBS.sum().to(ScalarType.Float64);
                var weighted = lm!.detach().to(ScalarType.Float64) * counted;
                // A micro-batch (or a context-parallel rank's chunks) with no counted token has a NaN mean that weighs nothing.
                sums[0].add_(torch.where(counted.gt(0), weighted, torch.zeros_like(weighted)));
                sums[1].add_(counted);
            }
            output = (m.NoneCounted ? lm!.nan_to_num(0.0) * 0.0 : m.LmFactor == 1.0 ? lm! : lm! * m.LmFactor) / microBatches;
        }
        else output = xBSH;
        output.DetachFromDisposeScope();
        input?.DetachFromDisposeScope();
        return new Live(input, output);
    }

    /// <summary>What a forward keeps for its backward.</summary>
    private sealed record Live(Tensor? Input, Tensor Output) : IDisposable
    {
        public void Dispose()
        {
            Output.Dispose();
            Input?.Dispose();
        }
    }

    /// <summary>A transfer's identity: micro-batch m's activation into, or gradient out of, virtual stage <c>To</c>.</summary>
    private readonly record struct Message(bool IsGradient, int MicroBatch, int To)
    {
        /// <summary>The activation virtual stage <paramref name="to"/> takes as input.</summary>
        public static Message Activation(int microBatch, int to) => new(false, microBatch, to);

        /// <summary>The gradient of virtual stage <paramref name="to"/>'s output.</summary>
        public static Message Gradient(int microBatch, int to) => new(true, microBatch, to);

        public override string ToString() => $"{(IsGradient ? "gradient" : "activation")} of micro-batch {MicroBatch} for virtual stage {To}";
    }

    /// <summary>
    /// The stage's point-to-point traffic: what each peer sends here, in the peer's order (from its schedule), and
    /// the messages received ahead of their use.
    /// </summary>
    private sealed class Channel : IDisposable
    {
        private readonly Communicator _pp;
        private readonly PipelineStage _stage;
        private readonly Dictionary<int, Queue<Message>> _incoming = new();
        private readonly Dictionary<Message, Tensor> _arrived = new();
        private readonly long[] _shape;

        /// <param name="pp">The pipeline group.</param>
        /// <param name="stage">This stage.</param>
        /// <param name="schedules">Every stage's schedule (stage order).</param>
        /// <param name="shape">[B, S / TP, H]: every activation and gradient the stages exchange.</param>
        public Channel(Communicator pp, PipelineStage stage, IReadOnlyList<PipelineAction>[] schedules, long[] shape)
        {
            _pp = pp;
            _shape = shape;
            _stage = stage;
            int pipeline = stage.Stages, virtualStages = pipeline * stage.ChunkCount;
            for (int peer = 0; peer < pipeline; peer++)
            {
                if (peer == stage.Stage) continue;
                var queue = new Queue<Message>();
                foreach (var a in schedules[peer])
                {
                    int from = a.Chunk * pipeline + peer;
                    int to = a.Backward ? from - 1 : from + 1;
                    if (to < 0 || to >= virtualStages || to % pipeline != stage.Stage) continue;
                    queue.Enqueue(a.Backward ? Message.Gradient(a.MicroBatch, to) : Message.Activation(a.MicroBatch, to));
                }
                _incoming[peer] = queue;
            }
        }

        /// <summary>A send of <paramref name="tensor"/> to the rank of virtual stage <paramref name="to"/>.</summary>
        public PeerTransfer SendTo(int to, Tensor tensor) => new(true, tensor.contiguous(), to % _stage.Stages);

        /// <summary>
        /// One exchange: <paramref name="sends"/>, and the receives <paramref name="next"/> needs, each preceded by what its
        /// sender sent before it.
        /// </summary>
        public void Flush(List<PeerTransfer> sends, PipelineAction? next, ScalarType dtype, Device device)
        {
            var transfers = new List<PeerTransfer>(sends);
            if (next is PipelineAction a && Needs(a) is Message wanted && !_arrived.ContainsKey(wanted))
            {
                int peer = a.Backward ? (_stage.VirtualStage(a.Chunk) + 1) % _stage.Stages : (_stage.VirtualStage(a.Chunk) - 1 + _stage.Stages) % _stage.Stages;
                var queue = _incoming[peer];
                while (true)
                {
                    if (queue.Count == 0)
                        throw new InvalidOperationException($"Pipeline stage {_stage.Stage}: member {peer} sends no {wanted}.");
                    var m = queue.Dequeue();
                    var buffer = torch.empty(_shape, dtype: dtype, device: device).DetachFromDisposeScope();
                    _arrived[m] = buffer;
                    transfers.Add(new PeerTransfer(false, buffer, peer));
                    if (m == wanted) break;
                }
            }
            _pp.Exchange(transfers);
            foreach (var t in sends) t.Tensor.Dispose();
        }

        /// <summary>The received tensor of <paramref name="m"/>, now the caller's.</summary>
        public Tensor Take(Message m)
        {
            if (!_arrived.Remove(m, out var t))
                throw new InvalidOperationException($"Pipeline stage {_stage.Stage}: the {m} was not received.");
            return t;
        }

        private Message? Needs(PipelineAction a)
        {
            int v = _stage.VirtualStage(a.Chunk);
            if (a.Backward) return _stage.IsLastVirtual(a.Chunk) ? null : Message.Gradient(a.MicroBatch, v);
            return _stage.IsFirstVirtual(a.Chunk) ? null : Message.Activation(a.MicroBatch, v);
        }

        public void Dispose()
        {
            foreach (var t in _arrived.Values) t.Dispose();
            _arrived.Clear();
        }
    }
}
