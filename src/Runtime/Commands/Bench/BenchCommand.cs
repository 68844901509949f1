using System.Diagnostics;
using System.Text.Json;
using Moe.Runtime.Devices;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Commands.Bench;

/// <summary>
/// The throughput protocol of shared/bench/hf_mixtral_baseline.py, on our model: forward + backward
/// (no optimizer step), one micro-batch of random ids, loss = lm_loss + 0.02 · aux_loss as transformers
/// computes it with output_router_logits, 3 warm-ups then the median of --iters steps, synchronised.
/// Model FLOPs count active parameters, causal attention at half cost and the LM head, ×3 for
/// forward + backward; MFU is against 790 TFLOP/s (bf16 matmul measured on an H200).
/// </summary>
public static class BenchCommand
{
    public sealed record Request(string Model, int Layers, int Seq, int MicroBatch, int Iters, string Device);

    public const double PeakTflops = 790;

    public static int Execute(Request r, TextWriter output, TextWriter? diagnostics = null)
    {
        if (r.Layers < 1 || r.Seq < 2 || r.MicroBatch < 1 || r.Iters < 1)
            throw new UserError("--layers, --micro-batch-size and --iters must be at least 1 and --seq at least 2.");
        var device = ComputeDevice.Resolve(r.Device);
        var preset = r.Model switch
        {
            "8x7b" => Dsl.Model.Mixtral8x7B,
            "8x22b" => Dsl.Model.Mixtral8x22B,
            _ => Dsl.Model.TinyMixtral,
        };
        var config = MixtralConfig.From(preset) with { Layers = r.Layers, MaxPositionEmbeddings = Math.Max(r.Seq, preset.MaxPositionEmbeddings), RouterAuxLossCoef = 0.02 };
        var dtype = device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;
        torch.manual_seed(0);
        using var model = new MixtralModel(config, new MoeOptions { TopK = config.TopK }, dtype, device);
        model.InitializeWeights(0);
        model.train();
        using var ids = torch.randint(0, config.VocabSize, new long[] { r.MicroBatch, r.Seq }, device: device);
        var (labels, mask) = MixtralModel.ShiftedLabels(ids);
        var parameters = model.parameters().ToArray();

        // Where the host spends a step: until the forward is queued, until backward() returns, and waiting for the GPU.
        var forwardMs = new List<double>();
        var backwardMs = new List<double>();
        var waitMs = new List<double>();

        void Step()
        {
            var watch = Stopwatch.StartNew();
            HostTrace.Start();
            using var _ = torch.NewDisposeScope();
            var o = model.Forward(ids, labels, mask, returnLogits: false);
            forwardMs.Add(watch.Elapsed.TotalMilliseconds);
            (o.LmLoss! + config.RouterAuxLossCoef * o.AuxLoss).backward();
            HostTrace.Mark("backward returned");
            ManagedBackward.Complete();
            foreach (var p in parameters) p.grad = null;
            backwardMs.Add(watch.Elapsed.TotalMilliseconds);
        }

        void Sync()
        {
            if (device.type == DeviceType.CUDA) torch.cuda.synchronize();
        }

        for (int i = 0; i < 3; i++) Step();
        Sync();
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
            ["host_backward_returned_ms"] = Median(backwardMs),
            ["host_wait_for_gpu_ms"] = Median(waitMs),
            ["gen0_collections"] = GC.CollectionCount(0) - collections,
        }));
        double stepSeconds = Median(times);
        double tokensPerSecond = r.MicroBatch * (double)r.Seq / stepSeconds;
        double flops = ModelFlopsPerToken(config, r.Seq) * tokensPerSecond;
        var result = new Dictionary<string, object?>
        {
            ["system"] = "moe",
            ["model"] = r.Model,
            ["layers"] = r.Layers,
            ["seq"] = r.Seq,
            ["gpus"] = 1,
            ["step_s"] = stepSeconds,
            ["tokens_per_s_per_gpu"] = tokensPerSecond,
            ["tflops_per_gpu"] = flops / 1e12,
            ["mfu"] = flops / (PeakTflops * 1e12),
            // Device memory in use after the steps (peak reserved + context); transformers reports max_memory_allocated.
            ["max_mem_gb"] = device.type == DeviceType.CUDA ? CudaMemory.InUseGiB() : null,
        };
        output.WriteLine(JsonSerializer.Serialize(result));
        return 0;
    }

    /// <summary>The baseline script's median: the middle value, the upper one of an even count (sorted[n / 2]).</summary>
    private static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        return sorted[sorted.Length / 2];
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
