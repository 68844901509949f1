namespace Moe.Generators;

/// <summary>A valid recipe's Megatron-Core rank layout, as <c>Moe.Dsl.Layout.RankLayout</c> computes it.</summary>
public sealed record LayoutSpec(
    int Gpus,
    int Tensor,
    int Pipeline,
    int Context,
    int Expert,
    int ExpertTensor,
    int DataParallel,
    int ExpertDataParallel,
    string Order,
    bool SequenceParallel,
    int VirtualPipeline,
    int Layers,
    int Experts,
    EquatableArray<RankSpec> Ranks,
    EquatableArray<GroupFamilySpec> Families,
    EquatableArray<GroupCreationSpec> CreationOrder,
    EquatableArray<StageLayersSpec> StageLayers,
    EquatableArray<ExpertRankSpec> ExpertRanks);

/// <summary>A rank's index in each of its tp, cp, dp, pp, dp-cp, ep, expert-tp and expert-dp groups.</summary>
public sealed record RankSpec(int Rank, int Tp, int Cp, int Dp, int Pp, int DpCp, int Ep, int Etp, int Edp);

/// <summary>One process-group family: its key in the Megatron vectors (e.g. "dp_cp") and its rank lists in Megatron's order.</summary>
public sealed record GroupFamilySpec(string Key, string PropertyName, string MegatronGroup, EquatableArray<EquatableArray<int>> Groups);

/// <summary>A run of <c>new_group</c> calls: <see cref="Count"/> groups of family <see cref="Family"/> from <see cref="FirstIndex"/>.</summary>
public sealed record GroupCreationSpec(string Description, string Backend, string Family, int FirstIndex, int Count);

/// <summary>The layers a pipeline stage holds in one virtual chunk: [FirstLayer, FirstLayer + LayerCount).</summary>
public sealed record StageLayersSpec(int Stage, int Chunk, int FirstLayer, int LayerCount);

/// <summary>The experts an expert-parallel rank owns: [FirstExpert, FirstExpert + ExpertCount).</summary>
public sealed record ExpertRankSpec(int ExpertRank, int FirstExpert, int ExpertCount);
