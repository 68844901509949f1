using System.CommandLine;

namespace Moe.Runtime.Commands.Bench;

/// <summary>Options of <c>moe bench</c>.</summary>
public sealed class BenchCommandDefinition
{
    public const string Name = "bench";

    public BenchCommandDefinition()
    {
        Command = new Command(Name, "Time forward + backward of a Mixtral-shaped model truncated to --layers layers on random ids, " +
            "bf16 on CUDA (median of --iters steps after 3 warm-ups), gradients reduced as training reduces them, and print one JSON line with the fields of " +
            "shared/bench/hf_mixtral_baseline.py and per-GPU tokens/s. --gpus N starts one process per GPU (threads on the CPU).");
        Model = new Option<string>("--model") { Description = "8x7b, 8x22b, or tiny (a CPU smoke test).", DefaultValueFactory = _ => "8x7b" };
        Model.AcceptOnlyFromAmong("8x7b", "8x22b", "tiny");
        Layers = new Option<int>("--layers") { Description = "Decoder layers.", DefaultValueFactory = _ => 2 };
        Seq = new Option<int>("--seq") { Description = "Sequence length.", DefaultValueFactory = _ => 4096 };
        MicroBatch = new Option<int>("--micro-batch-size") { Description = "Sequences per step.", DefaultValueFactory = _ => 1 };
        Iters = new Option<int>("--iters") { Description = "Timed steps (the median is reported).", DefaultValueFactory = _ => 10 };
        Device = new Option<string>("--device") { Description = "cuda (bf16) or cpu (fp32).", DefaultValueFactory = _ => "cuda" };
        Device.AcceptOnlyFromAmong("cpu", "cuda");
        Gpus = new Option<int>("--gpus") { Description = "Ranks (GPUs; threads with --device cpu).", DefaultValueFactory = _ => 1 };
        Context = new Option<int>("--cp") { Description = "Context-parallel size: each sequence is cut over that many ranks (divides --gpus; --seq a multiple of 2 × it).", DefaultValueFactory = _ => 1 };
        Expert = new Option<int>("--ep") { Description = "Expert-parallel size (divides --gpus and the experts).", DefaultValueFactory = _ => 1 };
        MicroBatches = new Option<int>("--micro-batches") { Description = "Micro-batches per step: gradients accumulate, then are reduced once.", DefaultValueFactory = _ => 1 };
        Dispatcher = new Option<string>("--dispatcher") { Description = "Token dispatcher under expert parallelism: alltoall or allgather.", DefaultValueFactory = _ => "alltoall" };
        Dispatcher.AcceptOnlyFromAmong("alltoall", "allgather");
        Pipeline = new Option<int>("--pp") { Description = "Pipeline-parallel size (divides --gpus and --layers; Megatron's 1F1B over --micro-batches).", DefaultValueFactory = _ => 1 };
        Tensor = new Option<int>("--tp") { Description = "Tensor-parallel size with sequence parallel (divides --gpus, the heads and --seq); experts split with ETP = TP.", DefaultValueFactory = _ => 1 };
        MainGrads = new Option<bool>("--main-grads")
        {
            Description = "Accumulate and reduce gradients in the trainer's fp32 main-gradient buffers (true, what training does) or leave them " +
                "in the parameters' bf16 .grad (false, one GPU: the transformers baseline's protocol).",
            DefaultValueFactory = _ => true,
        };
        Optimizer = new Option<bool>("--optimizer")
        {
            Description = "Also step the distributed optimizer (Adam with fp32 master weights and moments): a whole training step, " +
                "the memory `moe plan` estimates (needs --main-grads true).",
        };
        AllocatorStats = new Option<bool>("--allocator-stats")
        {
            Description = "Report the CUDA caching allocator's peaks (bytes allocated to tensors in the forward and the step, bytes reserved), " +
                "read through PyTorch 2.11's allocator object (docs/performance.md).",
        };
        OverlapGradReduce = new Option<bool>("--overlap-grad-reduce")
        {
            Description = "Start each expert bucket's data-parallel reduction inside the last micro-batch's backward, on NCCL's gradient stream " +
                "(Training.OverlapGradReduce, Megatron's --overlap-grad-reduce); off: every bucket after the backward.",
        };
        Recompute = new RecomputeOptions(Dsl.Recompute.Off);
        foreach (var o in new Option[] { Model, Layers, Seq, MicroBatch, Iters, Device, Gpus, Context, Expert, MicroBatches, Dispatcher, MainGrads, Tensor, Pipeline, Optimizer, AllocatorStats, OverlapGradReduce }.Concat(Recompute.All)) Command.Options.Add(o);
    }

    public Command Command { get; }
    public Option<string> Model { get; }
    public Option<int> Layers { get; }
    public Option<int> Seq { get; }
    public Option<int> MicroBatch { get; }
    public Option<int> Iters { get; }
    public Option<string> Device { get; }
    public Option<int> Gpus { get; }
    public Option<int> Context { get; }
    public Option<int> Expert { get; }
    public Option<int> MicroBatches { get; }
    public Option<string> Dispatcher { get; }
    public Option<bool> MainGrads { get; }
    public Option<int> Tensor { get; }
    public Option<int> Pipeline { get; }
    public Option<bool> Optimizer { get; }
    public Option<bool> AllocatorStats { get; }
    public Option<bool> OverlapGradReduce { get; }

    /// <summary>Megatron's <c>--recompute-granularity/-method/-num-layers/-modules</c>, to measure what recompute costs and saves.</summary>
    public RecomputeOptions Recompute { get; }
}
