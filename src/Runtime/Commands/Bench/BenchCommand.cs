using System.Diagnostics;
using System.Text.Json;
using Moe.Dsl.Layout;
using Moe.Runtime.Devices;
using Moe.Runtime.Distributed;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.Distributed.Launch;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using Moe.Runtime.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Commands.Bench;

/// <summary>
/// The throughput protocol of shared/bench/hf_mixtral_baseline.py, on our model and on every rank of a layout:
/// forward + backward (no optimizer step) of --micro-batches micro-batches of random ids per step, loss =
/// lm_loss + 0.02 · aux_loss as transformers computes it with output_router_logits, gradients accumulated in the
/// trainer's buffers (fp32 main gradients) and reduced over data parallel as training reduces them, 3 warm-ups
/// then the median of --iters steps, synchronised. Model FLOPs count active parameters, causal attention at half
/// cost and the LM head, ×3 for forward + backward; MFU is against 790 TFLOP/s (bf16 matmul measured on an H200).
/// With --gpus N on CUDA the ranks are processes (Moe's launcher, or torchrun/srun); on the CPU they are threads.
/// </summary>
public static class BenchCommand
{
    /// <param name="Model">8x7b, 8x22b or tiny.</param>
    /// <param name="Layers">Decoder layers.</param>
    /// <param name="Seq">Sequence length.</param>
    /// <param name="MicroBatch">Sequences per micro-batch.</param>
    /// <param name="Iters">Timed steps.</param>
    /// <param name="Device">cuda (bf16) or cpu (fp32).</param>
    /// <param name="Gpus">Ranks.</param>
    /// <param name="Expert">Expert-parallel size.</param>
    /// <param name="MicroBatches">Micro-batches per step (gradients accumulated, then reduced).</param>
    /// <param name="Dispatcher">alltoall or allgather.</param>
    /// <param name="MainGrads">
    /// Gradients go through the trainer's buffers (fp32 main gradients, Megatron's accumulate_allreduce_grads_in_fp32,
    /// reduced as training reduces them). False, one rank only: they stay in the parameters' own (bf16) .grad, as in
    /// the transformers baseline's protocol.
    /// </param>
    /// <param name="Tensor">Tensor-parallel size, with sequence parallel (experts split with ETP = TP, as Megatron defaults).</param>
    /// <param name="Context">Context-parallel size: each sequence is cut over that many ranks (<see cref="ContextParallel"/>).</param>
    /// <param name="Pipeline">Pipeline-parallel size: stages run Megatron's 1F1B schedule over the micro-batches, with Megatron's per-layer aux loss.</param>
    /// <param name="Recompute">Activation recompute (Megatron's --recompute-* flags); null: none.</param>
    /// <param name="Optimizer">Also run the distributed optimizer's step (Adam, fp32 master weights and moments): a whole
    /// training step, the memory the plan estimates. Needs <paramref name="MainGrads"/>.</param>
    /// <param name="AllocatorStats">Read the caching allocator's own statistics (<see cref="CudaAllocatorStats"/>): peak bytes
    /// allocated to tensors in the forward and in the whole step, and peak reserved.</param>
    /// <param name="OverlapGradReduce">Start the expert buckets' reductions inside the last micro-batch's backward (Training.OverlapGradReduce);
    /// refused with a note where the trainer refuses it (<see cref="GradientOverlap"/>).</param>
    public sealed record Request(string Model, int Layers, int Seq, int MicroBatch, int Iters, string Device,
        int Gpus = 1, int Expert = 1, int MicroBatches = 1, string Dispatcher = "alltoall", bool MainGrads = true, int Tensor = 1, int Context = 1, int Pipeline = 1, Dsl.Recompute? Recompute = null,
        bool Optimizer = false, bool AllocatorStats = false, bool OverlapGradReduce = false);

    public const double PeakTflops = 790;

    public static int Execute(Request r, TextWriter output, TextWriter? diagnostics = null)
    {
        if (r.Layers < 1 || r.Seq < 2 || r.MicroBatch < 1 || r.Iters < 1 || r.MicroBatches < 1)
            throw new UserError("--layers, --micro-batch-size, --micro-batches and --iters must be at least 1 and --seq at least 2.");
        if (r.Gpus < 1 || r.Expert < 1 || r.Gpus % r.Expert != 0)
            throw new UserError($"--gpus {r.Gpus} must be a positive multiple of --ep {r.Expert}.");
        if (r.Optimizer && !r.MainGrads)
            throw new UserError("--optimizer true steps the distributed optimizer on the fp32 main gradients; it needs --main-grads true.");
        if (r.OverlapGradReduce && !r.MainGrads)
            throw new UserError("--overlap-grad-reduce starts the reductions of the fp32 main-gradient buffers; it needs --main-grads true.");
        if (!r.MainGrads && r.Gpus > 1)
            throw new UserError($"--main-grads false keeps gradients in the parameters, which only one rank can do; --gpus {r.Gpus} reduces them through the main-gradient buffers.");
        var preset = Preset(r.Model);
        if (preset.Experts % r.Expert != 0)
            throw new UserError($"--ep {r.Expert} must divide the {preset.Experts} experts of {preset.Name}.");
        if (r.Tensor < 1 || r.Gpus % r.Tensor != 0 || r.Gpus % (r.Tensor * r.Expert) != 0)
            throw new UserError($"--gpus {r.Gpus} must be a multiple of --tp {r.Tensor} and of --tp × --ep = {r.Tensor * r.Expert} (experts are split over ETP = TP).");
        if (r.Context < 1 || r.Gpus % (r.Tensor * r.Context) != 0)
            throw new UserError($"--gpus {r.Gpus} must be a positive multiple of --tp × --cp = {r.Tensor * r.Context}.");
        ContextParallel.CheckSequence(r.Seq, r.Context, "--seq");
        if (r.Seq / r.Context % r.Tensor != 0)
            throw new UserError(r.Context == 1
                ? $"--seq {r.Seq} must be a multiple of --tp {r.Tensor}: sequence parallel gives each tensor rank --seq / --tp positions."
                : $"--seq {r.Seq} / --cp {r.Context} = {r.Seq / r.Context} must be a multiple of --tp {r.Tensor}: sequence parallel gives each tensor rank of a context-parallel rank that many / --tp positions.");
        if (r.Pipeline < 1 || r.Layers % r.Pipeline != 0 || r.Gpus % (r.Tensor * r.Context * r.Pipeline) != 0 || r.Gpus % (r.Tensor * r.Expert * r.Pipeline) != 0)
            throw new UserError($"--pp {r.Pipeline} must divide --layers {r.Layers}, and --tp × --cp × --pp ({r.Tensor} × {r.Context} × {r.Pipeline}) and --tp × --ep × --pp ({r.Tensor} × {r.Expert} × {r.Pipeline}) must divide --gpus {r.Gpus}.");
        // Refuses an invalid combination before any work; under --pp the bound of --recompute-num-layers is a stage's layers.
        RecomputePlan.For(r.Recompute ?? Dsl.Recompute.Off, PipelineStage.Of(StageSplit(r), r.Layers, 0));
        var layout = new RankLayout(r.Gpus, r.Tensor, r.Pipeline, r.Context, r.Expert, r.Tensor, RankOrder.TpCpEpDpPp);
        var timeout = TimeSpan.FromMinutes(10);
        if (r.Gpus == 1)
        {
            var device = ComputeDevice.Resolve(r.Device);
            using var groups = ProcessGroups.Create(new InProcessWorld(1, timeout).Communicator(0), layout);
            return Report(r, RunRank(r, new RankContext(groups, device), diagnostics), output);
        }
        if (r.Device == "cpu")
        {
            var results = InProcessJob.Run(layout, timeout, rank => RunRank(r, rank, null));
            return Report(r, results[0], output);
        }
        var launch = LaunchEnvironment.Detect();
        if (launch is null)
        {
            ComputeDevice.Resolve("cuda");
            if (torch.cuda.device_count() < r.Gpus)
                throw new UserError($"--gpus {r.Gpus}: this node has {torch.cuda.device_count()} GPUs.");
            string logs = Path.Combine(Path.GetTempPath(), $"moe-bench-{Environment.ProcessId}");
            var result = NodeLauncher.Run(r.Gpus, logs, [], output, passRunDirectory: false);
            if (result.ExitCode != 0) throw new UserError(result.Message);
            return 0;
        }
        RankBootstrap.SelectDevice(launch);
        var dev = ComputeDevice.Resolve("cuda");
        using var job = RankBootstrap.Join(launch, layout, dev, timeout, launch.Rank == 0 ? Console.Error : TextWriter.Null);
        var mine = RunRank(r, new RankContext(job.Groups, dev), launch.Rank == 0 ? diagnostics : null);
        return launch.Rank == 0 ? Report(r, mine, output) : 0;
    }

    /// <summary>What one rank measured: the median step and the device memory in use (the largest over the ranks).</summary>
    /// <param name="StepSeconds">The median step, the slowest rank's.</param>
    /// <param name="MemoryGiB">Device memory in use after the steps, the largest over the ranks.</param>
    /// <param name="Config">The model's configuration.</param>
    /// <param name="Allocator">Peak GiB allocated to tensors in the forward, in the whole step, and peak reserved (the largest over
    /// the timed steps and the ranks), and allocated when the first forward returned, with --allocator-stats.</param>
    private sealed record RankResult(double StepSeconds, double? MemoryGiB, MixtralConfig Config, (double Forward, double Step, double Reserved, double AfterForward)? Allocator);

    /// <summary>The even split of --layers over --pp stages (bench has no virtual pipeline or uneven stages).</summary>
    private static Dsl.Parallelism StageSplit(Request r) => new() { Gpus = r.Gpus, Pipeline = r.Pipeline };

    /// <summary>The model a --model name stands for (tiny for any other name).</summary>
    internal static Dsl.Model Preset(string model) => model switch
    {
        "8x7b" => Dsl.Model.Mixtral8x7B,
        "8x22b" => Dsl.Model.Mixtral8x22B,
        _ => Dsl.Model.TinyMixtral,
    };

    private static RankResult RunRank(Request r, RankContext rank, TextWriter? diagnostics)
    {
        var device = rank.Device;
        var preset = Preset(r.Model);
        var config = MixtralConfig.From(preset) with { Layers = r.Layers, MaxPositionEmbeddings = Math.Max(r.Seq, preset.MaxPositionEmbeddings), RouterAuxLossCoef = 0.02 };
        var dtype = device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;
        var dispatcher = r.Dispatcher == "allgather" ? Dsl.TokenDispatcher.AllGather : Dsl.TokenDispatcher.AllToAll;
        var plan = ParallelPlan.For(rank.Groups, config.Experts, dispatcher, sequenceParallel: r.Tensor > 1);
        // Tensor and context parallel split transformers' aux loss over all layers into nothing meaningful, and pipeline
        // stages need a loss per layer: take Megatron's per-layer aux_loss there (as training computes it).
        bool split = r.Tensor > 1 || r.Context > 1 || r.Pipeline > 1;
        var options = new MoeOptions { TopK = config.TopK, AuxLossConvention = split ? AuxLossConvention.Megatron : AuxLossConvention.Transformers };
        var stage = PipelineStage.Of(StageSplit(r), r.Layers, rank.Groups.Coordinates.Pp);
        using var model = new MixtralModel(config, options, dtype, device, plan, stage);
        model.InitializeWeights(0);
        model.train();
        var cp = ContextParallel.Apply(model, rank.Groups);
        model.Recomputation = RecomputePlan.For(r.Recompute ?? Dsl.Recompute.Off, stage);
        var parameters = model.ParametersInForwardOrder().ToList();
        bool overlap = r.OverlapGradReduce && r.MainGrads;
        if (overlap && GradientOverlap.Refusal(rank.Groups) is string refusal)
        {
            diagnostics?.WriteLine($"note: --overlap-grad-reduce is off for this layout: {refusal}.");
            overlap = false;
        }
        var buffers = r.MainGrads ? Trainer.BuffersFor(model, parameters, rank.Groups, overlap) : [];
        using var optimizer = r.Optimizer ? new DistributedOptimizer(buffers, rank.Groups.World, new AdamSettings(0.9, 0.95, 1e-8, 0.1), sharded: true) : null;
        // Allocator peaks: the forward's and the whole step's bytes allocated to tensors, and bytes reserved, per timed step.
        bool stats = r.AllocatorStats && device.type == DeviceType.CUDA;
        var forwardPeaks = new List<double>();
        var stepPeaks = new List<double>();
        double reservedPeak = 0, heldAfterForward = -1;
        double Gib(long bytes) => bytes / (double)(1L << 30);
        CudaAllocatorStats.Stats ReadStats() => CudaAllocatorStats.Read(out var why) ?? throw new UserError($"--allocator-stats: {why}.");
        // The cp ranks of one data-parallel rank draw the same sequences (seeded by the data-parallel rank) and keep their chunks.
        var generator = new torch.Generator((ulong)(1000 + rank.Groups.Dp.Rank));
        using var wholeIds = torch.randint(0, config.VocabSize, new long[] { r.MicroBatch, r.Seq }, generator: generator).to(device);
        var (wholeLabels, wholeMask) = MixtralModel.ShiftedLabels(wholeIds);
        var (ids, labels, mask) = (cp.Shard(wholeIds), cp.Shard(wholeLabels), cp.Shard(wholeMask));
        // lm_loss weighted over the whole sequence, router losses scaled by CP (MicroBatch.Loss); 1 and 1 without CP.
        double lmFactor = cp.LossFactor((long)mask.sum().item<float>(), (long)wholeMask.sum().item<float>());

        // Where the host spends a step: until the forward is queued, until backward() returns, and waiting for the GPU.
        var forwardMs = new List<double>();
        var backwardMs = new List<double>();
        var waitMs = new List<double>();

        void Step()
        {
            var watch = Stopwatch.StartNew();
            HostTrace.Start();
            foreach (var b in buffers) b.BindGradients();
            if (!r.MainGrads) foreach (var p in model.parameters()) p.grad = null;
            // After the last step's gradients are gone (the baseline sets them to None before its next step too).
            if (stats && !CudaAllocatorStats.ResetPeaks(out var whyNot)) throw new UserError($"--allocator-stats: {whyNot}.");
            MemoryTrace.Start();
            if (stage.Stages > 1)
            {
                using var _ = torch.NewDisposeScope();
                // This rank's global positions (its context-parallel chunks; the whole sequence at CP 1).
                var positions = torch.tensor(cp.LocalIndices(r.Seq), device: device).unsqueeze(0).expand(r.MicroBatch, ids.shape[1]);
                var sums = torch.zeros(6 + 2 * config.Layers * config.Experts, dtype: ScalarType.Float64, device: device);
                new PipelineRunner(model, rank.Groups.Pp, config.RouterAuxLossCoef, 0).Step(_ => new MicroBatchInputs(ids, labels, mask, positions, null, lmFactor), r.MicroBatches, sums,
                    afterBackward: () => { foreach (var b in buffers) b.AccumulateMicroBatch(); },
                    beforeLastBackward: () => { foreach (var b in buffers) b.BeginLastMicroBatch(sharded: true); });
                forwardMs.Add(watch.Elapsed.TotalMilliseconds);
            }
            else for (int m = 0; m < r.MicroBatches; m++)
            {
                using var _ = torch.NewDisposeScope();
                var o = model.Forward(ids, labels, mask, returnLogits: false);
                if (m == 0) forwardMs.Add(watch.Elapsed.TotalMilliseconds);
                if (m == 0 && stats)
                {
                    var afterForward = ReadStats();
                    forwardPeaks.Add(Gib(afterForward.AllocatedPeak));
                    heldAfterForward = Gib(afterForward.AllocatedCurrent);
                }
                var loss = (o.LmLoss! * lmFactor + cp.Size * config.RouterAuxLossCoef * o.AuxLoss) / r.MicroBatches;
                if (m == r.MicroBatches - 1) foreach (var b in buffers) b.BeginLastMicroBatch(sharded: true);
                loss.backward();
                ManagedBackward.Complete();
                foreach (var b in buffers) b.AccumulateMicroBatch();
            }
            HostTrace.Mark("backward returned");
            Trainer.SumReplicatedGradients(model, parameters, buffers);
            foreach (var b in buffers) b.Reduce(sharded: true);
            if (optimizer is not null)
            {
                HostTrace.Mark("gradients reduced");
                double norm = optimizer.GradientNorm();
                HostTrace.Mark("gradient norm");
                optimizer.Step(1e-5, Trainer.ClipFactor(norm, 1.0));
                HostTrace.Mark("optimizer step");
            }
            backwardMs.Add(watch.Elapsed.TotalMilliseconds);
            if (stats)
            {
                var now = ReadStats();
                stepPeaks.Add(Gib(now.AllocatedPeak));
                reservedPeak = Math.Max(reservedPeak, Gib(now.ReservedPeak));
            }
        }

        void Sync()
        {
            if (device.type == DeviceType.CUDA) torch.cuda.synchronize();
        }

        for (int i = 0; i < 3; i++) Step();
        Sync();
        rank.Groups.World.Barrier();
        forwardMs.Clear();
        backwardMs.Clear();
        forwardPeaks.Clear();
        stepPeaks.Clear();
        int collections = GC.CollectionCount(0);
        var times = new List<double>();
        var traces = new List<IReadOnlyList<(string Point, double Ms)>>();
        for (int i = 0; i < r.Iters; i++)
        {
            var watch = Stopwatch.StartNew();
            Step();
            Sync();
            times.Add(watch.Elapsed.TotalSeconds);
            waitMs.Add(watch.Elapsed.TotalMilliseconds - backwardMs[^1]);
            if (HostTrace.Enabled) traces.Add(HostTrace.Snapshot());
        }
        if (MemoryTrace.Enabled) diagnostics?.WriteLine("memory trace of the last step (GiB allocated now/peak since the previous point): " + MemoryTrace.Describe());
        if (traces.Count > 0)
        {
            // Median time of each point over the timed steps (points in their order within a step).
            var median = Enumerable.Range(0, traces[0].Count)
                .Select(i => $"{i}:{traces[0][i].Point}={Median(traces.Select(t => t[i].Ms)):F2}");
            diagnostics?.WriteLine("host trace (ms since step start): " + string.Join("  ", median));
        }
        diagnostics?.WriteLine(JsonSerializer.Serialize(new Dictionary<string, object>
        {
            ["host_forward_ms"] = Median(forwardMs),
            ["host_step_queued_ms"] = Median(backwardMs),
            ["host_wait_for_gpu_ms"] = Median(waitMs),
            ["gen0_collections"] = GC.CollectionCount(0) - collections,
        }));
        foreach (var b in buffers) b.Dispose();
        // The step time and memory every rank agrees on: the slowest rank's median, the largest memory.
        double? memory = device.type == DeviceType.CUDA ? CudaMemory.InUseGiB() : null;
        using var mine = torch.tensor(new double[] { Median(times), memory ?? -1, forwardPeaks.Count > 0 ? forwardPeaks.Max() : -1, stats ? stepPeaks.Max() : -1, stats ? reservedPeak : -1, heldAfterForward },
            device: rank.Groups.World.DeviceForScalars);
        rank.Groups.World.AllReduce(mine, Distributed.ReduceOp.Max);
        var v = mine.cpu().data<double>().ToArray();
        return new RankResult(v[0], v[1] < 0 ? null : v[1], config, stats ? (v[2], v[3], v[4], v[5]) : null);
    }

    private static int Report(Request r, RankResult result, TextWriter output)
    {
        // Per GPU: each data-parallel replica (TP × CP × PP GPUs) processes MicroBatches · MicroBatch · Seq tokens a step.
        double tokensPerSecond = r.MicroBatches * r.MicroBatch * (double)r.Seq / (r.Tensor * r.Context * r.Pipeline) / result.StepSeconds;
        double flops = ModelFlopsPerToken(result.Config, r.Seq) * tokensPerSecond;
        var json = new Dictionary<string, object?>
        {
            ["system"] = "moe",
            ["model"] = r.Model,
            ["layers"] = r.Layers,
            ["seq"] = r.Seq,
            ["gpus"] = r.Gpus,
            ["tp"] = r.Tensor,
            ["sp"] = r.Tensor > 1,
            ["ep"] = r.Expert,
            ["cp"] = r.Context,
            ["pp"] = r.Pipeline,
            ["dp"] = r.Gpus / (r.Tensor * r.Context * r.Pipeline),
            ["micro_batches"] = r.MicroBatches,
            ["dispatcher"] = r.Dispatcher,
            ["main_grads"] = r.MainGrads,
            ["overlap_grad_reduce"] = r.OverlapGradReduce,
            ["recompute"] = RecomputeOptions.Describe(r.Recompute ?? Dsl.Recompute.Off),
            ["step_s"] = result.StepSeconds,
            ["tokens_per_s_per_gpu"] = tokensPerSecond,
            ["tflops_per_gpu"] = flops / 1e12,
            ["mfu"] = flops / (PeakTflops * 1e12),
            // Device memory in use after the steps (peak reserved + context), the largest over the ranks.
            ["max_mem_gb"] = result.MemoryGiB,
            ["optimizer"] = r.Optimizer,
        };
        if (result.Allocator is var (forward, step, reserved, afterForward))
        {
            // The caching allocator's peaks (GiB): tensors in the forward (-1 under pipelining, whose forwards interleave
            // with backwards), tensors in the whole step, and reserved from the device (max_mem_gb less the CUDA context).
            json["alloc_forward_peak_gb"] = forward < 0 ? null : forward;
            json["alloc_after_forward_gb"] = afterForward < 0 ? null : afterForward;
            json["alloc_peak_gb"] = step;
            json["reserved_peak_gb"] = reserved;
        }
        // What the plan's estimate (docs/memory.md) says this rank holds, term by term in GiB, for what the bench runs.
        var estimate = BenchEstimate.For(r, result.Config);
        json["estimate_gb"] = estimate.Total;
        json["estimate_terms_gb"] = estimate.Terms;
        output.WriteLine(JsonSerializer.Serialize(json));
        return 0;
    }

    /// <summary>The baseline script's median: the middle value, the upper one of an even count (sorted[n / 2]).</summary>
    private static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        return sorted.Length == 0 ? 0 : sorted[sorted.Length / 2];
    }

    /// <summary>hf_mixtral_baseline.py's count: 3 × (L · (qkvo + attention + top-k experts + router) + LM head).</summary>
    public static double ModelFlopsPerToken(MixtralConfig c, int seq)
    {
        double h = c.HiddenSize, hd = (double)c.HiddenSize / c.Heads;
        double qkvo = 2 * (2 * h * h + 2 * h * c.KeyValueHeads * hd);
        double attention = 2 * 2 * (double)seq * h * 0.5;
        double experts = c.TopK * 3 * 2 * h * c.IntermediateSize;
        double router = 2 * h * c.Experts;
        return 3 * (c.Layers * (qkvo + attention + experts + router) + 2 * h * c.VocabSize);
    }
}
