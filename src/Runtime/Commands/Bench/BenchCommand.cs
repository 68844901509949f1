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
    /// <param name="Recompute">Activation recompute (Megatron's --recompute-* flags); null: none.</param>
    public sealed record Request(string Model, int Layers, int Seq, int MicroBatch, int Iters, string Device,
        int Gpus = 1, int Expert = 1, int MicroBatches = 1, string Dispatcher = "alltoall", bool MainGrads = true, Dsl.Recompute? Recompute = null);

    public const double PeakTflops = 790;

    public static int Execute(Request r, TextWriter output, TextWriter? diagnostics = null)
    {
        if (r.Layers < 1 || r.Seq < 2 || r.MicroBatch < 1 || r.Iters < 1 || r.MicroBatches < 1)
            throw new UserError("--layers, --micro-batch-size, --micro-batches and --iters must be at least 1 and --seq at least 2.");
        if (r.Gpus < 1 || r.Expert < 1 || r.Gpus % r.Expert != 0)
            throw new UserError($"--gpus {r.Gpus} must be a positive multiple of --ep {r.Expert}.");
        if (!r.MainGrads && r.Gpus > 1)
            throw new UserError($"--main-grads false keeps gradients in the parameters, which only one rank can do; --gpus {r.Gpus} reduces them through the main-gradient buffers.");
        var preset = Preset(r.Model);
        RecomputePlan.For(r.Recompute ?? Dsl.Recompute.Off, r.Layers);   // refuses an invalid combination before any work
        if (preset.Experts % r.Expert != 0)
            throw new UserError($"--ep {r.Expert} must divide the {preset.Experts} experts of {preset.Name}.");
        var layout = new RankLayout(r.Gpus, 1, 1, 1, r.Expert, 1, RankOrder.TpCpEpDpPp);
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
    private sealed record RankResult(double StepSeconds, double? MemoryGiB, MixtralConfig Config);

    private static Dsl.Model Preset(string model) => model switch
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
        var plan = ParallelPlan.For(rank.Groups, config.Experts, dispatcher);
        using var model = new MixtralModel(config, new MoeOptions { TopK = config.TopK }, dtype, device, plan);
        model.InitializeWeights(0);
        model.train();
        model.Recomputation = RecomputePlan.For(r.Recompute ?? Dsl.Recompute.Off, r.Layers);
        var buffers = r.MainGrads ? Trainer.BuffersFor(model, model.ParametersInForwardOrder().ToList(), rank.Groups) : [];
        var generator = new torch.Generator((ulong)(1000 + rank.Groups.Dp.Rank));
        using var ids = torch.randint(0, config.VocabSize, new long[] { r.MicroBatch, r.Seq }, generator: generator).to(device);
        var (labels, mask) = MixtralModel.ShiftedLabels(ids);

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
            for (int m = 0; m < r.MicroBatches; m++)
            {
                using var _ = torch.NewDisposeScope();
                var o = model.Forward(ids, labels, mask, returnLogits: false);
                if (m == 0) forwardMs.Add(watch.Elapsed.TotalMilliseconds);
                ((o.LmLoss! + config.RouterAuxLossCoef * o.AuxLoss) / r.MicroBatches).backward();
                ManagedBackward.Complete();
                foreach (var b in buffers) b.AccumulateMicroBatch();
            }
            HostTrace.Mark("backward returned");
            foreach (var b in buffers) b.Reduce(sharded: true);
            backwardMs.Add(watch.Elapsed.TotalMilliseconds);
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
        using var mine = torch.tensor(new double[] { Median(times), memory ?? -1 }, device: rank.Groups.World.DeviceForScalars);
        rank.Groups.World.AllReduce(mine, Distributed.ReduceOp.Max);
        var v = mine.cpu().data<double>().ToArray();
        return new RankResult(v[0], v[1] < 0 ? null : v[1], config);
    }

    private static int Report(Request r, RankResult result, TextWriter output)
    {
        double tokensPerSecond = r.MicroBatches * r.MicroBatch * (double)r.Seq / result.StepSeconds;
        double flops = ModelFlopsPerToken(result.Config, r.Seq) * tokensPerSecond;
        var json = new Dictionary<string, object?>
        {
            ["system"] = "moe",
            ["model"] = r.Model,
            ["layers"] = r.Layers,
            ["seq"] = r.Seq,
            ["gpus"] = r.Gpus,
            ["ep"] = r.Expert,
            ["dp"] = r.Gpus,
            ["micro_batches"] = r.MicroBatches,
            ["dispatcher"] = r.Dispatcher,
            ["main_grads"] = r.MainGrads,
            ["recompute"] = RecomputeOptions.Describe(r.Recompute ?? Dsl.Recompute.Off),
            ["step_s"] = result.StepSeconds,
            ["tokens_per_s_per_gpu"] = tokensPerSecond,
            ["tflops_per_gpu"] = flops / 1e12,
            ["mfu"] = flops / (PeakTflops * 1e12),
            // Device memory in use after the steps (peak reserved + context), the largest over the ranks.
            ["max_mem_gb"] = result.MemoryGiB,
        };
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
