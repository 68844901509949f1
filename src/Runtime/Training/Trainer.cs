using System.Diagnostics;
using Moe.Dsl;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Data;
using Moe.Runtime.Devices;
using Moe.Runtime.Monitoring;
using Moe.Runtime.Distributed;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.Training;

/// <summary>Where samples come from: index i of the run's sample stream.</summary>
public interface ISampleSource : IDisposable
{
    GptSample Sample(long index);
}

/// <summary>How a run ended.</summary>
/// <param name="Steps">Every step's metrics.</param>
/// <param name="StopReason">Why the run stopped before its last step (a signal in Health.StopOn), or null.</param>
public sealed record TrainResult(IReadOnlyList<StepMetrics> Steps, string? StopReason = null);

/// <summary>What one rank of a job is: its process groups and its device. Passed down, never kept in statics.</summary>
/// <param name="Groups">This rank's process groups.</param>
/// <param name="Device">This rank's device.</param>
public sealed record RankContext(ProcessGroups Groups, Device Device)
{
    /// <summary>Whether this rank prints progress and writes the metrics (global rank 0).</summary>
    public bool Reports => Groups.Rank == 0;

    /// <summary>A job of one rank on <paramref name="device"/>: every group has one member.</summary>
    public static RankContext Single(RecipeSettings settings, Device device)
    {
        var world = new InProcessWorld(1, Timeouts.Collective(settings)).Communicator(0);
        return new RankContext(ProcessGroups.Create(world, new Dsl.Layout.RankLayout(1, 1, 1, 1, 1, 1, Dsl.Layout.RankOrder.TpCpEpDpPp)), device);
    }
}

/// <summary>
/// The trainer of one rank, in torchtitan's order: build the single-device model → parallelize it from
/// outside (identity at size 1) → initialise or load → optimizer → schedule. AdamW with decoupled weight
/// decay (none on norm weights), Megatron's warm-up then cosine/linear decay, global-norm clipping,
/// gradient accumulation over GlobalBatchSize / (MicroBatchSize · DP) micro-batches, seeded. fp32 on CPU;
/// bf16 on a GPU with fp32 main gradients and weights (TorchSharp has no autocast).
/// </summary>
/// <remarks>
/// <para>
/// Data parallel as Megatron-Core does it: each data-parallel rank reads its share of every global batch in
/// Megatron's order (micro-batch m of rank r is the global batch's micro-batch m·DP + r, so the union is
/// the one-device run's micro-batches); gradients live in <see cref="GradientBuffer"/>s — dense ones reduced
/// over data parallel × context parallel, expert ones over expert data parallel — and the
/// <see cref="DistributedOptimizer"/> owns a shard of each. Each micro-batch's loss is the mean over its
/// counted tokens divided by the number of micro-batches, gradients are pre-scaled by 1/DP and summed: the
/// one-device run's gradient. The reported lm_loss is Megatron's: the token-weighted mean over the global batch.
/// </para>
/// <para>
/// Context parallel (<see cref="ContextParallel"/>): the cp ranks of a data-parallel rank read the same samples and
/// each trains its two chunks of every sequence (<see cref="MicroBatch"/>); losses are scaled so that the gradients
/// averaged over data × context parallel are the one-device run's, and the step's sums are reduced over dp × cp.
/// </para>
/// <para>
/// A NaN or infinite loss or gradient norm stops the run before the optimizer step, naming the last good
/// step; every rank sees the same reduced values, so all stop together.
/// </para>
/// </remarks>
public sealed class Trainer : IDisposable
{
    private readonly RecipeSettings _s;
    private readonly RankContext _rank;
    private readonly MixtralModel _model;
    private readonly List<GradientBuffer> _buffers = new();
    private readonly DistributedOptimizer _optimizer;
    private readonly ContextParallel _context;
    private readonly bool _ownsRank;

    /// <summary>A one-rank trainer on <paramref name="device"/> (the one-device run).</summary>
    /// <param name="settings">The recipe's settings; Checkpoint.Load names a checkpoint to start from.</param>
    /// <param name="device">The device.</param>
    /// <param name="log">Progress and notes.</param>
    /// <param name="load">How a checkpoint in Checkpoint.Load may differ from the recipe (null: not at all).</param>
    public Trainer(RecipeSettings settings, Device device, TextWriter log, CheckpointLoadOptions? load = null)
        : this(settings, RankContext.Single(settings, device), log, ownsRank: true, load)
    {
    }

    /// <summary>The trainer of one rank of a job.</summary>
    /// <param name="settings">The recipe's settings; Checkpoint.Load names a checkpoint to start from.</param>
    /// <param name="rank">This rank's groups and device.</param>
    /// <param name="log">Progress and notes (rank 0's; pass TextWriter.Null on the others).</param>
    /// <param name="load">How a checkpoint in Checkpoint.Load may differ from the recipe (null: not at all).</param>
    public Trainer(RecipeSettings settings, RankContext rank, TextWriter log, CheckpointLoadOptions? load = null) : this(settings, rank, log, ownsRank: false, load)
    {
    }

    private Trainer(RecipeSettings settings, RankContext rank, TextWriter log, bool ownsRank, CheckpointLoadOptions? load)
    {
        _s = settings;
        _rank = rank;
        _ownsRank = ownsRank;
        var device = rank.Device;
        var dtype = settings.Training.Precision == Precision.Bf16 && device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;
        if (settings.Training.Precision == Precision.Bf16 && dtype == ScalarType.Float32 && rank.Reports)
            log.WriteLine("note: bf16 on the CPU is emulated and slow; training in fp32.");
        var options = MoeOptions.From(settings);
        ContextParallel.CheckSequence(settings.Data.SequenceLength, rank.Groups.Cp.Size);   // MOE0206 again: overrides may follow validation
        var plan = ParallelPlan.For(rank.Groups, settings.Model.Experts, settings.Dispatcher, settings.Parallelism.SequenceParallel);

        // 1. The single-device model. 2. Parallelize: the plan cuts this rank's part as it is built.
        // 3. Initialise (seeded, the same on every rank) or load: a Hugging Face folder gives the weights only; a Moe
        //    checkpoint is restored whole once the optimizer exists (5. below).
        var checkpoint = settings.Checkpoint.Load is string path ? CheckpointSource.Resolve(path) : null;
        var stage = PipelineStage.Of(settings.Parallelism with { Pipeline = rank.Groups.Layout.Pipeline }, settings.Model.Layers, rank.Groups.Coordinates.Pp);
        _model = new MixtralModel(MixtralConfig.From(settings.Model), options, dtype, device, plan, stage);
        if (stage.Stages > 1) PipelineSchedules.For(stage.Stages, stage.Stage, MicroBatches, stage.ChunkCount);   // a schedule the micro-batches cannot fill fails now
        _context = ContextParallel.Apply(_model, rank.Groups);
        _model.Recomputation = RecomputePlan.For(settings.Recompute, stage);   // full recompute: each model chunk of this stage its own layers, as Megatron
        if (checkpoint is { IsMoe: false }) CheckpointReader.LoadHuggingFace(_model, checkpoint, settings, load, rank.Reports ? log : TextWriter.Null);
        else if (checkpoint is null) _model.InitializeWeights(settings.Training.Seed);
        _model.train();

        // 4. Gradient buffers and the optimizer over them.
        Parameters = _model.ParametersInForwardOrder().ToList();
        bool overlap = settings.Training.OverlapGradReduce;
        if (overlap && GradientOverlap.Refusal(rank.Groups) is string refusal)
        {
            if (rank.Reports) log.WriteLine($"note: Training.OverlapGradReduce is off for this layout: {refusal}.");
            overlap = false;
        }
        _buffers.AddRange(BuffersFor(_model, Parameters, rank.Groups, overlap));
        _optimizer = new DistributedOptimizer(_buffers, rank.Groups.World, AdamSettings.From(settings.Training), settings.Training.DistributedOptimizer);

        // 5. Resume a Moe checkpoint: weights, optimizer state and step, resharded to this layout; Run continues after it.
        if (checkpoint is { IsMoe: true })
        {
            try
            {
                CompletedSteps = CheckpointReader.Restore(this, checkpoint, load, rank.Reports ? log : TextWriter.Null);
            }
            catch
            {
                Dispose();
                throw;
            }
        }
    }

    // ---- Checkpoint seams (issue 14): what a save reads and a restore sets ----

    /// <summary>The settings this trainer runs.</summary>
    public RecipeSettings Settings => _s;

    /// <summary>This rank's groups and device.</summary>
    public RankContext Rank => _rank;

    /// <summary>The optimizer (its state is a checkpoint's largest part).</summary>
    public DistributedOptimizer Optimizer => _optimizer;

    /// <summary>Steps done: 0 for a new run, the checkpoint's step after a restore; <see cref="Run"/> continues from the next and updates it.</summary>
    public int CompletedSteps { get; private set; }

    /// <summary>Set (by an after-step hook) to end <see cref="Run"/> after the current step, e.g. on SIGTERM once the checkpoint is saved.</summary>
    public bool StopRequested { get; set; }

    /// <summary>The reason the observers gave for stopping after the current step (a health signal in Health.StopOn), seen by the after-step hook; null to go on.</summary>
    public string? StopReason { get; private set; }

    /// <summary>
    /// The gradient buffers of a rank's parameters (given in forward order): the dense ones reduced over data ×
    /// context parallel, the experts' over expert data parallel, each in backward order, both pre-scaled by 1/DP
    /// as Megatron's gradient_scaling_factor is.
    /// </summary>
    /// <remarks>
    /// In bf16 the experts' weight gradients go straight into their fp32 main gradients (<see cref="GradientSink"/>,
    /// Megatron's gradient-accumulation fusion): the expert buffer is direct and each layer's experts get its sinks.
    /// With <paramref name="overlapGradReduce"/> (<see cref="GradientOverlap"/> has allowed it) they get sinks in fp32 too,
    /// since a sink tells the buffer that a bucket is ready, and both buffers reduce through the asynchronous path.
    /// </remarks>
    public static List<GradientBuffer> BuffersFor(MixtralModel model, IReadOnlyList<ModelParameter> parameters, ProcessGroups groups, bool overlapGradReduce = false)
    {
        var inBackwardOrder = parameters.Reverse().ToList();
        double scale = 1.0 / groups.DpCp.Size;
        // Tensor parallel: a parameter every tensor rank holds whole (norms, router) is counted in the norm by the first only.
        var dense = inBackwardOrder.Where(p => !p.IsExpert).Select(p => (p.Name, p.Parameter, Decays(p.Parameter), model.TensorParallel.CountsInNorm(p))).ToList();
        var expert = inBackwardOrder.Where(p => p.IsExpert).Select(p => (p.Name, p.Parameter, Decays(p.Parameter), true)).ToList();
        var buffers = new List<GradientBuffer> { new("dense", dense, groups.DpCp, BucketElements(groups.DpCp.Size), scale, overlap: overlapGradReduce) };
        // Replicated key-value heads: the key/value rows another rank of the group counts are left out of this rank's norm.
        foreach (var p in parameters.Where(p => p.Pieces is not null && p.Pieces.Any(x => x.IsDuplicate)))
            buffers[0].Uncount(p.Parameter, p.Pieces!.Where(x => x.IsDuplicate).Select(x => (x.Start, x.Length)).ToList());
        if (expert.Count > 0)
        {
            var experts = new GradientBuffer("expert", expert, groups.Edp, BucketElements(groups.Edp.Size), scale, direct: true, overlap: overlapGradReduce);
            buffers.Add(experts);
            if (experts.Direct)
                foreach (var layer in model.Layers)
                {
                    var w = layer.Moe.ExpertWeights;
                    w.Sinks = new ExpertGradientSinks(experts.SinkOf(w.GateUp), experts.SinkOf(w.Down));
                }
        }
        return buffers;
    }

    public MixtralModel Model => _model;

    /// <summary>This rank's parameters in forward order, with names and shards.</summary>
    public IReadOnlyList<ModelParameter> Parameters { get; }

    /// <summary>Layouts whose parallelism this runtime does not implement yet are refused, never run wrong.</summary>
    /// <summary>The gradient buffers (dense, then expert): after a step's reduction they hold the reduced gradients.</summary>
    public IReadOnlyList<GradientBuffer> Buffers => _buffers;

    /// <summary>
    /// The reduced gradients of the last step by parameter name, whole (collective over each buffer's group: a
    /// sharded buffer's shards are all-gathered). For tests and debugging; valid after a step, until the next
    /// step begins; the tensors belong to the caller (outside any dispose scope).
    /// </summary>
    public Dictionary<string, Tensor> ReducedGradients()
    {
        var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        using var _ = torch.no_grad();
        foreach (var buffer in _buffers)
        {
            foreach (var bucket in buffer.Buckets)
            {
                using var view = buffer.MainGrad.narrow(0, bucket.Start, bucket.Length);
                var whole = view.clone();
                if (_optimizer.Sharded)
                {
                    var (start, length) = buffer.Shard(bucket);
                    buffer.Group.AllGather(buffer.MainGrad.narrow(0, start, length).contiguous(), whole);
                }
                foreach (var e in buffer.EntriesOf(bucket))
                    result[e.Name] = whole.narrow(0, e.Offset - bucket.Start, e.Numel).view(e.Parameter.shape).clone().DetachFromDisposeScope();
            }
        }
        return result;
    }

    /// <summary>Megatron's bucket size: max(40M, 1M·DP) elements (distributed/distributed_data_parallel.py).</summary>
    public static long BucketElements(int dataParallel) => Math.Max(40_000_000L, 1_000_000L * dataParallel);

    /// <summary>
    /// Whether weight decay applies to a parameter. Megatron's convention (get_param_groups): matrices
    /// (linear, expert, router and embedding weights) decay; 1-D parameters — norm weights and biases — do not.
    /// Mixtral has no biases, so in practice the RMSNorm weights are the exempt ones.
    /// </summary>
    public static bool Decays(Parameter p) => p.dim() >= 2;

    /// <summary>Micro-batches per optimizer step on each data-parallel rank.</summary>
    public int MicroBatches => Math.Max(1, _s.GradientAccumulationSteps);

    /// <summary>
    /// Sample indices of micro-batch <paramref name="micro"/> of <paramref name="step"/> on this rank: Megatron's
    /// pretraining sampler hands each global batch out micro-batch by micro-batch, MicroBatchSize·DP samples at a
    /// time, data-parallel rank r taking the r-th MicroBatchSize of them.
    /// </summary>
    public long FirstSample(int step, int micro)
    {
        var t = _s.Training;
        int dp = _rank.Groups.Dp.Size, dpRank = _rank.Groups.Dp.Rank;
        return (long)(step - 1) * t.GlobalBatchSize + ((long)micro * dp + dpRank) * t.MicroBatchSize;
    }

    /// <summary>
    /// Trains Steps optimizer steps. Every rank calls <paramref name="observer"/>'s StepEnded with the same
    /// reduced metrics (losses averaged, token counts summed over data parallel; device memory and all-to-all
    /// time the largest over the ranks), so checks made from them decide alike everywhere; the caller gives the
    /// writers (metrics file, TensorBoard, progress) to the reporting rank only. A stop asked by an observer on any
    /// rank stops every rank after that step.
    /// </summary>
    public TrainResult Run(ISampleSource data, ITrainingObserver observer, Action<int>? afterStep = null)
    {
        var t = _s.Training;
        int microBatches = MicroBatches;
        int b = t.MicroBatchSize, seq = _s.Data.SequenceLength;
        double auxCoeff = _s.Router.LoadBalancing == LoadBalancing.None ? 0 : _s.AuxLossCoeff;
        double zCoeff = _s.Router.ZLossCoeff ?? 0;
        var history = new List<StepMetrics>();
        var device = _rank.Device;
        var groups = _rank.Groups;
        int layers = _model.Config.Layers, experts = _model.Config.Experts;
        observer.RunStarted();
        for (int step = CompletedSteps + 1; step <= t.Steps; step++)
        {
            var watch = Stopwatch.StartNew();
            using var scope = torch.NewDisposeScope();
            double lr = LearningRate.At(step, t);
            foreach (var buffer in _buffers) buffer.BindGradients();
            groups.Ep.TakeSeconds();   // the step's all-to-all time counts from here
            // Device-side sums over the step's micro-batches, read back once: [lm sum, counted tokens, aux, z, routed,
            // kept, kept per expert (L·E), routed per expert (L·E)].
            var sums = torch.zeros(6 + 2 * layers * experts, dtype: ScalarType.Float64, device: device);
            if (_model.Stage.Stages > 1)
                // Megatron divides the z-loss coefficient by the tp_cp size (each rank's z is its own positions' mean).
                new PipelineRunner(_model, groups.Pp, auxCoeff, zCoeff / groups.TpCp.Size).Step(micro => PipelineInputs(data, step, micro), microBatches, sums,
                    afterBackward: () => { foreach (var buffer in _buffers) buffer.AccumulateMicroBatch(); },
                    beforeLastBackward: () => { foreach (var buffer in _buffers) buffer.BeginLastMicroBatch(_optimizer.Sharded); });
            else for (int micro = 0; micro < microBatches; micro++)
            {
                // Each micro-batch's handles go when it is done, so accumulation holds one micro-batch's activations.
                using var microScope = torch.NewDisposeScope();
                long first = FirstSample(step, micro);
                var batch = Enumerable.Range(0, b).Select(i => data.Sample(first + i)).ToArray();
                var mb = MicroBatch.From(batch, seq, device, _context, _s.Data.ResetAttentionMask);
                var o = _model.Forward(mb.TokensBS, mb.LabelsBS, mb.LossMaskBS, mb.PositionIdsBS, mb.DocumentIdsBS, returnLogits: false);
                var microLoss = mb.Loss(o, _context, groups.TpCp, auxCoeff, zCoeff) / microBatches;
                // Overlap: the last backward starts each expert bucket's reduction once its gradients are in.
                if (micro == microBatches - 1) foreach (var buffer in _buffers) buffer.BeginLastMicroBatch(_optimizer.Sharded);
                microLoss.backward();
                ManagedBackward.Complete();
                foreach (var buffer in _buffers) buffer.AccumulateMicroBatch();
                using (torch.no_grad())
                {
                    var counted = torch.tensor((double)mb.LocalCounted, dtype: ScalarType.Float64, device: device);
                    var kept = torch.stack(o.Layers.Select(l => l.TokensPerExpert).ToArray()).flatten().to(ScalarType.Float64);
                    var routed = torch.stack(o.Layers.Select(l => l.RoutedPerExpert).ToArray()).flatten().to(ScalarType.Float64);
                    sums.add_(torch.cat(new[]
                    {
                        torch.stack(new[] { mb.LmSum(o.LmLoss!), counted,
                            o.AuxLoss.detach().to(ScalarType.Float64) / microBatches,
                            (o.ZLoss ?? torch.zeros(1, device: device).squeeze()).detach().to(ScalarType.Float64) / microBatches,
                            routed.sum(), kept.sum() }),
                        kept, routed,
                    }));
                }
            }
            SumReplicatedGradientsOverTensorParallel();
            foreach (var buffer in _buffers) buffer.Reduce(_optimizer.Sharded);

            // One reduction and one read-back of the step's numbers: over the pipeline stages first (each holds its
            // layers' numbers, the last stage the LM loss), then over data × context parallel, then the partial ones
            // (aux, z, counts) over tensor parallel: lm sums, counted tokens and expert counts add up; the tensor- and
            // context-parallel ranks' aux losses are shares of their sequences' (they add up too), their z-losses
            // means over equal numbers of tokens (averaged over dp × tp × cp).
            var reduced = sums.to(groups.DpCp.DeviceForScalars);
            groups.Pp.AllReduce(reduced);
            groups.DpCp.AllReduce(reduced);
            SumPartialMetricsOverTensorParallel(reduced);
            var v = reduced.cpu().data<double>().ToArray();
            int dp = groups.Dp.Size;
            double lm = v[1] > 0 ? v[0] / v[1] : 0, aux = v[2] / dp, z = v[3] / (dp * groups.TpCp.Size);
            double loss = lm + auxCoeff * aux + zCoeff * z;
            double routedPairs = v[4], keptPairs = v[5];
            long[][] Counts(int at) => Enumerable.Range(0, layers).Select(l => Enumerable.Range(0, experts).Select(e => (long)Math.Round(v[at + l * experts + e])).ToArray()).ToArray();
            if (!double.IsFinite(loss))
            {
                string last = history.Count == 0 ? "no step completed" : $"the last good step was {history[^1].Step} (loss {history[^1].Loss:G5})";
                throw new UserError($"The loss became {(double.IsNaN(loss) ? "NaN" : "infinite")} at step {step}; {last}. Training stopped before the optimizer step, " +
                    $"so the weights are those after step {step - 1}. Lower the learning rate (it was {lr:G3}) or check the data.");
            }
            double gradNorm = _optimizer.GradientNorm();
            if (!double.IsFinite(gradNorm))
            {
                string last = history.Count == 0 ? "no step completed" : $"the last good step was {history[^1].Step} (loss {history[^1].Loss:G5})";
                throw new UserError($"The gradient norm became {(double.IsNaN(gradNorm) ? "NaN" : "infinite")} at step {step} (the loss was {loss:G5}); {last}. Training stopped before the optimizer step, " +
                    $"so the weights are those after step {step - 1}. Lower the learning rate (it was {lr:G3}) or check the data.");
            }
            _optimizer.Step(lr, ClipFactor(gradNorm, t.ClipGrad));
            _model.ResetGlobalAuxLoss();   // global_aux_loss counts span one global batch (Megatron resets per iteration)
            UpdateExpertBias();
            if (device.type == DeviceType.CUDA) torch.cuda.synchronize();
            double seconds = watch.Elapsed.TotalSeconds;
            var (memoryUsed, memoryTotal, allToAllSeconds) = LargestOverRanks(device, groups.Ep.Size > 1 && groups.Ep.MeasuresTime ? groups.Ep.TakeSeconds() : null);
            var m = new StepMetrics(step, loss, lm, aux, z, lr, gradNorm, Counts(6), routedPairs > 0 ? 1 - keptPairs / routedPairs : 0,
                (double)t.GlobalBatchSize * seq / seconds)
            {
                RoutedPerExpert = Counts(6 + layers * experts),
                StepSeconds = seconds,
                MemoryUsedBytes = memoryUsed,
                MemoryTotalBytes = memoryTotal,
                AllToAllSeconds = allToAllSeconds,
            };
            m = observer.StepEnded(m);
            m = AgreeOnStop(m);
            history.Add(m);
            CompletedSteps = step;
            StopReason = m.StopReason;
            afterStep?.Invoke(step);
            if (m.StopReason is not null || StopRequested) break;
        }
        var result = new TrainResult(history, history.Count > 0 ? history[^1].StopReason : null);
        observer.RunEnded(result);
        return result;
    }

    /// <summary>Micro-batch <paramref name="micro"/> of <paramref name="step"/> on this rank, as the one-device loop reads it.</summary>
    private MicroBatchInputs PipelineInputs(ISampleSource data, int step, int micro)
    {
        int b = _s.Training.MicroBatchSize, seq = _s.Data.SequenceLength;
        var device = _rank.Device;
        long first = FirstSample(step, micro);
        var batch = Enumerable.Range(0, b).Select(i => data.Sample(first + i)).ToArray();
        return MicroBatch.From(batch, seq, device, _context, _s.Data.ResetAttentionMask).ForPipeline(_context);
    }

    /// <summary>
    /// Sequence parallel: the norms' and the router's gradients (whole on every tensor rank, each seeing its own
    /// positions) summed over the tensor-parallel group before the data-parallel reduction (Megatron's
    /// finalize_model_grads, _allreduce_non_tensor_model_parallel_grads).
    /// </summary>
    private void SumReplicatedGradientsOverTensorParallel() => SumReplicatedGradients(_model, Parameters, _buffers);

    /// <summary>
    /// Sums over the tensor-parallel group the accumulated gradients of the parameters every tensor rank holds whole
    /// (<see cref="TensorParallel.IsReplicated"/>); call after the micro-batches, before the buffers reduce. Nothing at TP 1.
    /// </summary>
    public static void SumReplicatedGradients(MixtralModel model, IReadOnlyList<ModelParameter> parameters, IEnumerable<GradientBuffer> buffers)
    {
        var tp = model.TensorParallel;
        if (tp.Size == 1) return;
        var replicated = parameters.Where(tp.IsReplicated).Select(p => p.Name).ToHashSet(StringComparer.Ordinal);
        // Replicated key-value heads (R017): each replica's k/v rows saw only its own query heads; summed over the group's ranks.
        var shared = parameters.Where(p => p.Pieces is not null).ToDictionary(p => p.Name, p => p.Pieces!.Where(x => x.IsShared).ToList(), StringComparer.Ordinal);
        foreach (var buffer in buffers)
            tp.SumReplicatedGradients(buffer.MainGrad, buffer.Entries.Where(e => replicated.Contains(e.Name)).Select(e => (e.Offset, e.Numel)).ToList(),
                buffer.Entries.Where(e => shared.ContainsKey(e.Name)).SelectMany(e => shared[e.Name].Select(x => (e.Offset + x.Start, x))).ToList());
    }

    /// <summary>
    /// Sequence parallel: every tensor rank has the whole lm loss and token count (entries 0 and 1 of the step's
    /// sums) but only its positions' aux and z losses and routed counts (the rest): those are summed over TP.
    /// </summary>
    private void SumPartialMetricsOverTensorParallel(Tensor sums)
    {
        var tp = _model.TensorParallel;
        if (tp.Size == 1) return;
        using var partial = sums.narrow(0, 2, sums.shape[0] - 2).to(tp.Group.DeviceForScalars).contiguous().clone();
        tp.Group.AllReduce(partial);
        sums.narrow(0, 2, sums.shape[0] - 2).copy_(partial);
    }

    /// <summary>
    /// Aux-loss-free balancing: each layer's expert-bias counts summed over tensor × data × context parallel (the
    /// whole global batch, as Megatron's _update_router_expert_bias reduces them) before the bias moves.
    /// </summary>
    private void UpdateExpertBias()
    {
        var biased = _model.Layers.Select(l => l.Moe.ExpertBias).Where(e => e is not null).ToList();
        if (biased.Count > 0 && _rank.Groups.TpDpCp.Size > 1)
        {
            using var scope = torch.NewDisposeScope();
            var stacked = torch.stack(biased.Select(e => e!.CountsE).ToArray());
            _rank.Groups.TpDpCp.AllReduce(stacked);
            using (torch.no_grad())
                for (int i = 0; i < biased.Count; i++) biased[i]!.CountsE.copy_(stacked[i]);
        }
        _model.UpdateExpertBias();
    }

    /// <summary>Device memory (used, total) and all-to-all seconds, the largest over every rank (one small all-reduce); nulls where not measured.</summary>
    private (long? Used, long? Total, double? AllToAll) LargestOverRanks(Device device, double? allToAll)
    {
        var memory = device.type == DeviceType.CUDA ? CudaMemory.Info() : null;
        if (_rank.Groups.World.Size == 1) return (memory?.Used, memory?.Total, allToAll);
        using var values = torch.tensor(new double[] { memory?.Used ?? -1, memory?.Total ?? -1, allToAll ?? -1 }, device: _rank.Groups.World.DeviceForScalars);
        _rank.Groups.World.AllReduce(values, ReduceOp.Max);
        var v = values.cpu().data<double>().ToArray();
        return (v[0] < 0 ? null : (long)v[0], v[1] < 0 ? null : (long)v[1], v[2] < 0 ? null : v[2]);
    }

    /// <summary>Any rank's stop stops all: the reason of the lowest rank that asked, or a note that another rank did.</summary>
    private StepMetrics AgreeOnStop(StepMetrics m)
    {
        var world = _rank.Groups.World;
        if (world.Size == 1) return m;
        var asked = world.AllGatherScalars(m.StopReason is null ? 0 : 1);
        int first = Array.IndexOf(asked, 1L);
        if (first < 0 || m.StopReason is not null) return m;
        return m with { StopReason = $"rank {first} stopped the run after step {m.Step} (its log says why)" };
    }

    /// <summary>
    /// Global-norm clipping (Megatron's --clip-grad, clip_grad_norm_fp32): when the norm of all gradients
    /// together exceeds <paramref name="maxNorm"/>, every gradient is scaled by maxNorm / (norm + 1e-6); 0 turns
    /// clipping off. Returns that factor (1 when not clipping).
    /// </summary>
    public static double ClipFactor(double norm, double maxNorm)
    {
        if (maxNorm <= 0) return 1;
        double coefficient = maxNorm / (norm + 1e-6);
        return coefficient < 1 ? coefficient : 1;
    }

    public void Dispose()
    {
        _optimizer.Dispose();
        foreach (var buffer in _buffers) buffer.Dispose();
        _model.Dispose();
        if (_ownsRank) _rank.Groups.Dispose();
    }
}

/// <summary>Samples of a Megatron indexed dataset's training split.</summary>
public sealed class IndexedSampleSource : ISampleSource
{
    private readonly IndexedDataset _data;
    private readonly IndexedDataset? _lossMask;
    private readonly GptDataset _samples;

    /// <param name="s">The recipe (Data and Training).</param>
    /// <param name="eodId">End-of-document token id.</param>
    /// <param name="split">0 train, 1 validation, 2 test: the part of Data.Split to draw from.</param>
    /// <param name="samples">Samples the run draws (default: Steps × GlobalBatchSize).</param>
    public IndexedSampleSource(RecipeSettings s, int eodId, int split = 0, int? samples = null)
    {
        string prefix = s.Data.Prefix ?? throw new UserError("Data.Prefix is not set: training needs a dataset (a Megatron .bin/.idx prefix).");
        _data = IndexedDataset.Open(prefix);
        string[] names = ["training", "validation", "test"];
        var range = DataSplits.Ranges(s.Data.Split, _data.SequenceCount)[split]
            ?? throw new UserError($"Data.Split \"{s.Data.Split}\" gives the {names[split]} split no weight.");
        if (range.End <= range.Start)
            throw new UserError($"Data.Split \"{s.Data.Split}\" gives the {names[split]} split no sequence of the {_data.SequenceCount} in {prefix}; give it a larger weight or use more data.");
        samples ??= checked(s.Training.Steps * s.Training.GlobalBatchSize);
        if (s.Data.Format == DataFormat.Sft)
        {
            if (!prefix.EndsWith("_text_document", StringComparison.Ordinal))
                throw new UserError($"Data.Prefix \"{prefix}\": SFT data is written by `moe preprocess --sft` as <prefix>_text_document with <prefix>_lossmask_document beside it.");
            _lossMask = IndexedDataset.Open(prefix[..^"_text_document".Length] + "_lossmask_document");
        }
        _samples = new GptDataset(_data, range, samples.Value, SampleOptions.From(s.Data, eodId), s.Training.Seed, _lossMask);
    }

    public GptSample Sample(long index) => _samples.Sample(index);

    public void Dispose()
    {
        _data.Dispose();
        _lossMask?.Dispose();
    }
}
