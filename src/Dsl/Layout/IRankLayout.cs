using System.Collections.Generic;

namespace Moe.Dsl.Layout;

/// <summary>
/// One view of Megatron-Core 0.20's rank layout (<c>initialize_model_parallel</c>): the parallel sizes,
/// every process-group family, each rank's coordinates and the order in which communicators are created.
/// The runtime builds its process groups from it; <see cref="RankLayout"/> computes every answer from the
/// two grids' strides, a generated recipe wiring answers from its tables or from the same strides, and
/// <see cref="LayoutSource.For"/> chooses between them.
/// </summary>
/// <remarks>
/// <para>
/// Families are keyed as in Megatron's rank vectors (<see cref="RankLayout.FamilyKeys"/>): tp, cp, dp, dp_cp,
/// pp, mp, tp_pp, tp_cp, tp_dp, tp_dp_cp, embedding, position_embedding, ep, expert_tp, expert_dp, tp_ep,
/// tp_ep_pp, intra_dist_opt, gtp_remat, expert_gtp_remat. An unknown key throws <see cref="System.ArgumentException"/>
/// naming the valid ones; a rank or group index out of range throws <see cref="System.ArgumentOutOfRangeException"/>.
/// </para>
/// <para>
/// Every family except embedding and position_embedding partitions the ranks: each rank is in exactly one of
/// its groups. A rank that is neither the first nor the last pipeline stage is in no embedding group, and one
/// that is not the first stage in no position-embedding group (parallel_state.py, <c>embedding_ranks</c>).
/// Implementations are immutable and safe to call from several threads (in-process ranks share one object).
/// </para>
/// </remarks>
public interface IRankLayout
{
    /// <summary>World size: the number of ranks (GPUs), Megatron's <c>WORLD_SIZE</c>.</summary>
    int World { get; }

    /// <summary>Tensor-parallel size (<c>--tensor-model-parallel-size</c>).</summary>
    int Tensor { get; }

    /// <summary>Pipeline-parallel size (<c>--pipeline-model-parallel-size</c>).</summary>
    int Pipeline { get; }

    /// <summary>Context-parallel size (<c>--context-parallel-size</c>).</summary>
    int Context { get; }

    /// <summary>Expert-parallel size (<c>--expert-model-parallel-size</c>).</summary>
    int Expert { get; }

    /// <summary>Expert tensor-parallel size (<c>--expert-tensor-parallel-size</c>; Megatron defaults it to the tensor-parallel size).</summary>
    int ExpertTensor { get; }

    /// <summary>Dense data-parallel size, <see cref="World"/> / (tp·pp·cp).</summary>
    int DataParallel { get; }

    /// <summary>Expert data-parallel size, <see cref="World"/> / (etp·ep·pp).</summary>
    int ExpertDataParallel { get; }

    /// <summary>Rank order of both grids (<c>order</c> of <c>initialize_model_parallel</c>; <c>--use-tp-pp-dp-mapping</c> selects <see cref="RankOrder.TpCpEpPpDp"/>).</summary>
    RankOrder Order { get; }

    /// <summary>How many groups <paramref name="family"/> has (1 for intra_dist_opt, <see cref="World"/> for gtp_remat).</summary>
    int GroupCount(string family);

    /// <summary>
    /// The members of group <paramref name="index"/> of <paramref name="family"/> in Megatron's order: ascending,
    /// except intra_dist_opt, which lists the tp_ep_pp groups one after the other (torch sorts it when the
    /// group is created). A fresh array the caller may keep; O(group size).
    /// </summary>
    int[] Group(string family, int index);

    /// <summary>
    /// Which group of <paramref name="family"/> holds <paramref name="rank"/>: the index for <see cref="Group"/>,
    /// the same on every member, so it serves as the colour of <c>ncclCommSplit</c>. −1 (NCCL's
    /// <c>NCCL_SPLIT_NOCOLOR</c>) when the rank is in none of the family's groups (embedding, position_embedding).
    /// </summary>
    int GroupIndexOf(string family, int rank);

    /// <summary>The members of the group of <paramref name="family"/> that holds <paramref name="rank"/>, in Megatron's order; empty when none does.</summary>
    int[] GroupOf(string family, int rank);

    /// <summary>The rank's index in its tp, cp, dp, pp, dp-cp, ep, expert-tp and expert-dp groups (the group rank torch assigns).</summary>
    RankCoordinates Coordinates(int rank);

    /// <summary>
    /// Every <c>new_group</c> call of <c>initialize_model_parallel</c>, in the order every rank must make it,
    /// run-length encoded: consecutive calls of one description over consecutive groups of one family form a run.
    /// </summary>
    IReadOnlyList<GroupCreation> CreationOrder { get; }
}

/// <summary>A rank's index inside its tp, cp, dp, pp, dp-cp, ep, expert-tp and expert-dp groups.</summary>
/// <param name="Tp">Index in the tensor-parallel group (<c>get_tensor_model_parallel_rank</c>).</param>
/// <param name="Cp">Index in the context-parallel group (<c>get_context_parallel_rank</c>).</param>
/// <param name="Dp">Index in the data-parallel group (<c>get_data_parallel_rank</c>).</param>
/// <param name="Pp">Pipeline stage: index in the pipeline group (<c>get_pipeline_model_parallel_rank</c>).</param>
/// <param name="DpCp">Index in the data-parallel group with context parallel (<c>get_data_parallel_rank(with_context_parallel=True)</c>).</param>
/// <param name="Ep">Index in the expert-parallel group (<c>get_expert_model_parallel_rank</c>): which experts the rank owns.</param>
/// <param name="Etp">Index in the expert tensor-parallel group (<c>get_expert_tensor_parallel_rank</c>).</param>
/// <param name="Edp">Index in the expert data-parallel group (<c>get_expert_data_parallel_rank</c>).</param>
public sealed record RankCoordinates(int Tp, int Cp, int Dp, int Pp, int DpCp, int Ep, int Etp, int Edp);

/// <summary>A run of <c>new_group</c> calls: <see cref="Count"/> groups of family <see cref="GroupsKey"/> from <see cref="FirstIndex"/>.</summary>
/// <param name="Description">Megatron's <c>group_desc</c>, e.g. <c>DATA_PARALLEL_GROUP</c> or <c>DATA_PARALLEL_GROUP_GLOO</c>.</param>
/// <param name="Backend"><c>nccl</c> or <c>gloo</c>.</param>
/// <param name="GroupsKey">The family whose groups are created (a key of <see cref="RankLayout.FamilyKeys"/>).</param>
/// <param name="FirstIndex">Index of the first group of the run in its family.</param>
/// <param name="Count">Number of consecutive groups created.</param>
public sealed record GroupCreation(string Description, string Backend, string GroupsKey, int FirstIndex, int Count);
