using System;

namespace Moe.Generators.Specs;

/// <summary>A contiguous range [Start, Start + Count).</summary>
public sealed record RangeSpec(int Start, int Count);

/// <summary>
/// Everything the generator emits for one recipe, as plain values (no symbols, syntax or compilation):
/// equal specs mean equal output, so unrelated edits leave the pipeline cached. The layout's groups are not
/// stored: the emitter computes them from these sizes (a spec stays small at any world size).
/// </summary>
public sealed record RecipeSpec
{
    public string Namespace { get; init; } = "";
    public string ClassName { get; init; } = "";
    public string ModelName { get; init; } = "";

    /// <summary>The layout is known and valid; otherwise only the fallback is emitted.</summary>
    public bool LayoutKnown { get; init; }

    /// <summary>Why there is no wiring: the rule set's errors, or the settings that are not constants.</summary>
    public EquatableArray<string> Problems { get; init; }

    public int Gpus { get; init; }
    public int Tensor { get; init; }
    public int Pipeline { get; init; }
    public int Context { get; init; }
    public int Expert { get; init; }
    public int ExpertTensor { get; init; }
    public int DataParallel { get; init; }
    public int ExpertDataParallel { get; init; }
    public int VirtualPipeline { get; init; }
    public string Order { get; init; } = "";
    public int Layers { get; init; }
    public int Experts { get; init; }

    /// <summary>Up to this many GPUs the wiring lists every group (<c>[Recipe(WiringTableLimit = …)]</c>); above it, it computes them.</summary>
    public int WiringTableLimit { get; init; }

    /// <summary>Per pipeline stage, its layer ranges (one per virtual chunk).</summary>
    public EquatableArray<EquatableArray<RangeSpec>> StageLayers { get; init; }

    /// <summary>Per expert-parallel rank, its experts.</summary>
    public EquatableArray<RangeSpec> ExpertsOfRank { get; init; }
}
