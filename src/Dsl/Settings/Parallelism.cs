using Moe.Dsl.Layout;

namespace Moe.Dsl;

/// <summary>
/// How the job is spread over GPUs. Data parallelism is never typed: it is derived from the GPU
/// count (<see cref="DataParallel"/>, <see cref="ExpertDataParallel"/>), as Megatron-Core derives it.
/// </summary>
public sealed record Parallelism
{
    /// <summary>Total number of GPUs (the world size). Re-checked at start-up against the real WORLD_SIZE.</summary>
    public int Gpus { get; init; } = 1;

    /// <summary>
    /// The GPU model every rank runs on; the plan and rule MOE0301 check the per-GPU memory estimate against it.
    /// Default: <see cref="Gpu.H100"/>. The plan's <c>--gpu</c> option overrides it.
    /// </summary>
    public Gpu Gpu { get; init; } = Gpu.H100;

    /// <summary>Tensor-parallel size. Megatron: <c>--tensor-model-parallel-size</c>.</summary>
    public int Tensor { get; init; } = 1;

    /// <summary>Pipeline-parallel size. Megatron: <c>--pipeline-model-parallel-size</c>.</summary>
    public int Pipeline { get; init; } = 1;

    /// <summary>
    /// Virtual pipeline stages per pipeline rank (interleaved 1F1B); null for none.
    /// Megatron: <c>--num-virtual-stages-per-pipeline-rank</c>.
    /// </summary>
    public int? VirtualPipeline { get; init; }

    /// <summary>Layers on the first pipeline stage when uneven; null for an even split. Megatron: <c>--decoder-first-pipeline-num-layers</c>.</summary>
    public int? FirstStageLayers { get; init; }

    /// <summary>Layers on the last pipeline stage when uneven; null for an even split. Megatron: <c>--decoder-last-pipeline-num-layers</c>.</summary>
    public int? LastStageLayers { get; init; }

    /// <summary>Context-parallel size (the sequence split over ranks). Megatron: <c>--context-parallel-size</c>.</summary>
    public int Context { get; init; } = 1;

    /// <summary>Expert-parallel size: how many ranks share one layer's experts. Megatron: <c>--expert-model-parallel-size</c>.</summary>
    public int Expert { get; init; } = 1;

    /// <summary>Expert tensor-parallel size; null means equal to <see cref="Tensor"/>. Megatron: <c>--expert-tensor-parallel-size</c>.</summary>
    public int? ExpertTensor { get; init; }

    /// <summary>Sequence parallelism (needs Tensor &gt; 1; required for MoE training with Tensor &gt; 1). Megatron: <c>--sequence-parallel</c>.</summary>
    public bool SequenceParallel { get; init; }

    /// <summary>Rank order. Megatron: <c>tp-cp-ep-dp-pp</c> by default, <c>tp-cp-ep-pp-dp</c> with <c>--use-tp-pp-dp-mapping</c>.</summary>
    public RankOrder Order { get; init; } = RankOrder.TpCpEpDpPp;

    /// <summary>The effective expert tensor-parallel size (<see cref="ExpertTensor"/>, else <see cref="Tensor"/>).</summary>
    public int EffectiveExpertTensor => ExpertTensor ?? Tensor;

    /// <summary>Ranks that hold one copy of the dense model: Tensor × Pipeline × Context.</summary>
    public int ModelParallelProduct => Tensor * Pipeline * Context;

    /// <summary>Ranks that hold one copy of the experts: ExpertTensor × Expert × Pipeline.</summary>
    public int ExpertParallelProduct => EffectiveExpertTensor * Expert * Pipeline;

    /// <summary>Derived dense data-parallel size: Gpus / (Tensor × Pipeline × Context); 0 when it does not divide.</summary>
    public int DataParallel => ModelParallelProduct > 0 && Gpus % ModelParallelProduct == 0 ? Gpus / ModelParallelProduct : 0;

    /// <summary>Derived expert data-parallel size: Gpus / (ExpertTensor × Expert × Pipeline); 0 when it does not divide.</summary>
    public int ExpertDataParallel => ExpertParallelProduct > 0 && Gpus % ExpertParallelProduct == 0 ? Gpus / ExpertParallelProduct : 0;
}
