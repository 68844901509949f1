using Moe.Runtime.Commands.Bench;
using Moe.Runtime.Devices;
using Moe.Runtime.Modeling;
using Moe.Runtime.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Monitoring;

/// <summary>
/// Adds what the device knows to each step: memory in use and in total (cudaMemGetInfo, the same reading as
/// <c>moe bench</c>'s max_mem_gb) and model FLOPs utilisation — the FLOPs per token of <c>moe bench</c>
/// (<see cref="BenchCommand.ModelFlopsPerToken"/>) × tokens/s over <see cref="BenchCommand.PeakTflops"/> (bf16
/// matmul measured on an H200), as Megatron's <c>--log-throughput</c> reports it. On the CPU neither is known and
/// both stay null.
/// </summary>
public sealed class DeviceStats(MixtralConfig config, int sequenceLength, Device device) : ITrainingObserver
{
    private readonly double _flopsPerToken = BenchCommand.ModelFlopsPerToken(config, sequenceLength);

    public StepMetrics StepEnded(StepMetrics m)
    {
        if (device.type != DeviceType.CUDA) return m;
        var memory = CudaMemory.Info();
        return m with
        {
            Mfu = _flopsPerToken * m.TokensPerSecond / (BenchCommand.PeakTflops * 1e12),
            MemoryUsedBytes = m.MemoryUsedBytes ?? memory?.Used,     // the trainer's reading is the largest over the ranks
            MemoryTotalBytes = m.MemoryTotalBytes ?? memory?.Total,
        };
    }
}
