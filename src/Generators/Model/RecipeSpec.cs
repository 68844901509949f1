using System;

namespace Moe.Generators.Specs;

/// <summary>One process-group family: its Megatron key and its groups (ascending rank lists).</summary>
public sealed record GroupFamilySpec(string Key, EquatableArray<EquatableArray<int>> Groups);

/// <summary>One run of communicator creation: Megatron's description, backend, family, first group, count.</summary>
public sealed record CreationSpec(string Description, string Backend, string Family, int First, int Count);

/// <summary>A contiguous range [Start, Start + Count).</summary>
public sealed record RangeSpec(int Start, int Count);

/// <summary>A rank's index in its tp, cp, dp, pp, dp-cp, ep, expert-tp and expert-dp groups.</summary>
public sealed record CoordinatesSpec(int Tp, int Cp, int Dp, int Pp, int DpCp, int Ep, int Etp, int Edp);

/// <summary>
/// Everything the generator emits for one recipe, as plain values (no symbols, syntax or compilation):
/// equal specs mean equal output, so unrelated edits leave the pipeline cached.
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

    public EquatableArray<GroupFamilySpec> Groups { get; init; }
    public EquatableArray<CoordinatesSpec> Coordinates { get; init; }
    public EquatableArray<CreationSpec> CreationOrder { get; init; }

    /// <summary>Per pipeline stage, its layer ranges (one per virtual chunk).</summary>
    public EquatableArray<EquatableArray<RangeSpec>> StageLayers { get; init; }

    /// <summary>Per expert-parallel rank, its experts.</summary>
    public EquatableArray<RangeSpec> ExpertsOfRank { get; init; }
}
