using System;
using System.Collections.Generic;
using System.Linq;

namespace Moe.Dsl.Layout;

/// <summary>
/// Megatron-Core 0.20's rank layout (<c>initialize_model_parallel</c>): rank ↔ coordinates on the dense
/// and expert grids, every process-group family in Megatron's enumeration order, and the order in
/// which communicators are created. Defaults as Megatron's: gtp_remat 1, one distributed-optimizer
/// instance, Gloo groups on, no hierarchical context parallel.
/// </summary>
/// <remarks>
/// Two grids share the W ranks and the order string: the dense grid has axes
/// (tp, cp, ep = 1, dp, pp) and the expert grid (etp, cp = 1, ep, edp, pp); the first axis varies
/// fastest. A group family is an orthogonal slice of a grid: the masked axes vary inside a group,
/// the others number the groups (parallel_state.py, generate_masked_orthogonal_rank_groups).
/// </remarks>
public sealed class RankLayout
{
    /// <summary>Builds the layout; throws <see cref="ArgumentException"/> for sizes that do not divide (validate with the rule set first).</summary>
    public RankLayout(int world, int tensor, int pipeline, int context, int expert, int expertTensor, RankOrder order)
    {
        if (world < 1 || tensor < 1 || pipeline < 1 || context < 1 || expert < 1 || expertTensor < 1)
            throw new ArgumentException("Every parallel size must be at least 1.");
        if (world % (tensor * pipeline * context) != 0)
            throw new ArgumentException($"World size {world} is not divisible by tp·pp·cp = {tensor * pipeline * context}.");
        if (world % (expertTensor * expert * pipeline) != 0)
            throw new ArgumentException($"World size {world} is not divisible by etp·ep·pp = {expertTensor * expert * pipeline}.");
        World = world;
        Tensor = tensor;
        Pipeline = pipeline;
        Context = context;
        Expert = expert;
        ExpertTensor = expertTensor;
        Order = order;
        DataParallel = world / (tensor * pipeline * context);
        ExpertDataParallel = world / (expertTensor * expert * pipeline);
        if (order == RankOrder.TpCpEpPpDp && pipeline > 1 && DataParallel != ExpertDataParallel)
            throw new ArgumentException("With order tp-cp-ep-pp-dp and pp > 1, expert data parallel must equal data parallel.");

        // Axis sizes in order-string order: tp, cp, ep, then dp/pp as the order says.
        bool dpBeforePp = order == RankOrder.TpCpEpDpPp;
        _dense = new Grid(dpBeforePp
            ? new[] { ("tp", tensor), ("cp", context), ("ep", 1), ("dp", DataParallel), ("pp", pipeline) }
            : new[] { ("tp", tensor), ("cp", context), ("ep", 1), ("pp", pipeline), ("dp", DataParallel) });
        _expert = new Grid(dpBeforePp
            ? new[] { ("tp", expertTensor), ("cp", 1), ("ep", expert), ("dp", ExpertDataParallel), ("pp", pipeline) }
            : new[] { ("tp", expertTensor), ("cp", 1), ("ep", expert), ("pp", pipeline), ("dp", ExpertDataParallel) });

        var groups = new Dictionary<string, int[][]>(StringComparer.Ordinal)
        {
            ["tp"] = _dense.Groups("tp"),
            ["cp"] = _dense.Groups("cp"),
            ["dp"] = _dense.Groups("dp"),
            ["dp_cp"] = _dense.Groups("dp", "cp"),
            ["pp"] = _dense.Groups("pp"),
            ["mp"] = _dense.Groups("tp", "pp"),
            ["tp_pp"] = _dense.Groups("tp", "pp"),
            ["tp_cp"] = _dense.Groups("tp", "cp"),
            ["tp_dp"] = _dense.Groups("tp", "dp"),
            ["tp_dp_cp"] = _dense.Groups("tp", "dp", "cp"),
        };
        // Embedding group: first and last stage of each pipeline (tied embeddings); position embedding: first stage.
        groups["embedding"] = groups["pp"].Select(g => g.Length == 1 ? new[] { g[0] } : new[] { g[0], g[g.Length - 1] }).ToArray();
        groups["position_embedding"] = groups["pp"].Select(g => new[] { g[0] }).ToArray();
        groups["ep"] = _expert.Groups("ep");
        groups["expert_tp"] = _expert.Groups("tp");
        groups["expert_dp"] = _expert.Groups("dp");
        groups["tp_ep"] = _expert.Groups("tp", "ep");
        groups["tp_ep_pp"] = _expert.Groups("tp", "ep", "pp");
        // One optimizer instance: all tp-ep-pp groups concatenated, in creation order (torch sorts it on creation).
        groups["intra_dist_opt"] = new[] { groups["tp_ep_pp"].SelectMany(g => g).ToArray() };
        groups["gtp_remat"] = Enumerable.Range(0, world).Select(r => new[] { r }).ToArray();
        groups["expert_gtp_remat"] = Enumerable.Range(0, world).Select(r => new[] { r }).ToArray();
        Groups = groups;
        CreationOrder = BuildCreationOrder(groups);
    }

    /// <summary>World size (GPUs).</summary>
    public int World { get; }

    /// <summary>Tensor-parallel size.</summary>
    public int Tensor { get; }

    /// <summary>Pipeline-parallel size.</summary>
    public int Pipeline { get; }

    /// <summary>Context-parallel size.</summary>
    public int Context { get; }

    /// <summary>Expert-parallel size.</summary>
    public int Expert { get; }

    /// <summary>Expert tensor-parallel size.</summary>
    public int ExpertTensor { get; }

    /// <summary>Rank order.</summary>
    public RankOrder Order { get; }

    /// <summary>Dense data-parallel size, W / (tp·pp·cp).</summary>
    public int DataParallel { get; }

    /// <summary>Expert data-parallel size, W / (etp·ep·pp).</summary>
    public int ExpertDataParallel { get; }

    /// <summary>The order string, e.g. "tp-cp-ep-dp-pp".</summary>
    public string OrderString => OrderName(Order);

    /// <summary>Group families keyed as in the Megatron vectors (tp, cp, dp, dp_cp, pp, mp, …); each a list of ascending rank lists (intra_dist_opt excepted).</summary>
    public IReadOnlyDictionary<string, int[][]> Groups { get; }

    /// <summary>Every communicator Megatron creates, in order, run-length encoded.</summary>
    public IReadOnlyList<GroupCreation> CreationOrder { get; }

    /// <summary>The group family keys in Megatron's listing order.</summary>
    public static IReadOnlyList<string> FamilyKeys { get; } = new[]
    {
        "tp", "cp", "dp", "dp_cp", "pp", "mp", "tp_pp", "tp_cp", "tp_dp", "tp_dp_cp", "embedding", "position_embedding",
        "ep", "expert_tp", "expert_dp", "tp_ep", "tp_ep_pp", "intra_dist_opt", "gtp_remat", "expert_gtp_remat",
    };

    /// <summary>A rank's index in each of its groups (the group-local rank torch assigns).</summary>
    public RankCoordinates Coordinates(int rank)
    {
        if (rank < 0 || rank >= World) throw new ArgumentOutOfRangeException(nameof(rank));
        int IndexIn(string family) => Array.IndexOf(Groups[family].First(g => Array.IndexOf(g, rank) >= 0), rank);
        return new RankCoordinates(IndexIn("tp"), IndexIn("cp"), IndexIn("dp"), IndexIn("pp"), IndexIn("dp_cp"), IndexIn("ep"), IndexIn("expert_tp"), IndexIn("expert_dp"));
    }

    /// <summary>The rank at dense-grid coordinates (tp, cp, dp, pp).</summary>
    public int DenseRank(int tp, int cp, int dp, int pp) => _dense.Rank(("tp", tp), ("cp", cp), ("dp", dp), ("pp", pp));

    /// <summary>The rank at expert-grid coordinates (etp, ep, edp, pp).</summary>
    public int ExpertRank(int etp, int ep, int edp, int pp) => _expert.Rank(("tp", etp), ("ep", ep), ("dp", edp), ("pp", pp));

    /// <summary>"tp-cp-ep-dp-pp" or "tp-cp-ep-pp-dp".</summary>
    public static string OrderName(RankOrder order) => order == RankOrder.TpCpEpDpPp ? "tp-cp-ep-dp-pp" : "tp-cp-ep-pp-dp";

    /// <summary>Parses an order string; null when it is not one of Megatron's two.</summary>
    public static RankOrder? ParseOrder(string text) => text switch
    {
        "tp-cp-ep-dp-pp" => RankOrder.TpCpEpDpPp,
        "tp-cp-ep-pp-dp" => RankOrder.TpCpEpPpDp,
        _ => null,
    };

    private readonly Grid _dense;
    private readonly Grid _expert;

    private static List<GroupCreation> BuildCreationOrder(IReadOnlyDictionary<string, int[][]> g)
    {
        var calls = new List<(string Desc, string Backend, string Key, int Index)>();
        void All(string desc, string key)
        {
            for (int i = 0; i < g[key].Length; i++) calls.Add((desc, "nccl", key, i));
        }
        void WithGloo(string desc, string key)
        {
            for (int i = 0; i < g[key].Length; i++)
            {
                calls.Add((desc, "nccl", key, i));
                calls.Add((desc + "_GLOO", "gloo", key, i));
            }
        }
        All("GTP_WEIGHT_REMAT_GROUP", "gtp_remat");
        WithGloo("DATA_PARALLEL_GROUP_WITH_CP", "dp_cp");
        WithGloo("DATA_PARALLEL_GROUP", "dp");
        All("CONTEXT_PARALLEL_GROUP", "cp");
        All("MODEL_PARALLEL_GROUP", "mp");
        All("TENSOR_MODEL_PARALLEL_GROUP", "tp");
        for (int i = 0; i < g["pp"].Length; i++)
        {
            calls.Add(("PIPELINE_MODEL_PARALLEL_GROUP", "nccl", "pp", i));
            calls.Add(("EMBEDDING_GROUP", "nccl", "embedding", i));
            calls.Add(("POSITION_EMBEDDING_GROUP", "nccl", "position_embedding", i));
        }
        All("TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP", "tp_dp_cp");
        All("TENSOR_AND_DATA_PARALLEL_GROUP", "tp_dp");
        All("TENSOR_AND_CONTEXT_PARALLEL_GROUP", "tp_cp");
        All("EXPERT_GTP_WEIGHT_REMAT_GROUP", "expert_gtp_remat");
        All("EXPERT_MODEL_PARALLEL_GROUP", "ep");
        All("EXPERT_TENSOR_PARALLEL_GROUP", "expert_tp");
        All("EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP", "tp_ep");
        All("EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP", "tp_ep_pp");
        All("EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP_WITH_EGTP", "tp_ep_pp");
        WithGloo("EXPERT_DATA_PARALLEL_GROUP", "expert_dp");
        All("INTRA_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP", "intra_dist_opt");

        var runs = new List<GroupCreation>();
        foreach (var c in calls)
        {
            var last = runs.Count > 0 ? runs[runs.Count - 1] : null;
            if (last is not null && last.Description == c.Desc && last.Backend == c.Backend && last.GroupsKey == c.Key && last.FirstIndex + last.Count == c.Index)
                runs[runs.Count - 1] = last with { Count = last.Count + 1 };
            else
                runs.Add(new GroupCreation(c.Desc, c.Backend, c.Key, c.Index, 1));
        }
        return runs;
    }

    /// <summary>One grid: named axes in order (first fastest) with their strides.</summary>
    private sealed class Grid
    {
        private readonly (string Name, int Size)[] _axes;
        private readonly int[] _strides;
        private readonly int _world;

        public Grid((string Name, int Size)[] axes)
        {
            _axes = axes;
            _strides = new int[axes.Length];
            int stride = 1;
            for (int i = 0; i < axes.Length; i++)
            {
                _strides[i] = stride;
                stride *= axes[i].Size;
            }
            _world = stride;
        }

        public int Rank(params (string Name, int Index)[] coords) =>
            coords.Sum(c => c.Index * _strides[Array.FindIndex(_axes, a => a.Name == c.Name)]);

        /// <summary>Groups whose members vary along <paramref name="masked"/>: group g's base is g in mixed radix over the unmasked axes (first fastest), member m likewise over the masked ones.</summary>
        public int[][] Groups(params string[] masked)
        {
            var inside = Enumerable.Range(0, _axes.Length).Where(i => masked.Contains(_axes[i].Name)).ToArray();
            var outside = Enumerable.Range(0, _axes.Length).Where(i => !masked.Contains(_axes[i].Name)).ToArray();
            int groupSize = inside.Aggregate(1, (p, i) => p * _axes[i].Size);
            int groupCount = _world / groupSize;
            var result = new int[groupCount][];
            for (int g = 0; g < groupCount; g++)
            {
                int baseRank = Decompose(g, outside);
                var members = new int[groupSize];
                for (int m = 0; m < groupSize; m++) members[m] = baseRank + Decompose(m, inside);
                result[g] = members;
            }
            return result;
        }

        private int Decompose(int index, int[] axes)
        {
            int rank = 0;
            foreach (int a in axes)
            {
                rank += index % _axes[a].Size * _strides[a];
                index /= _axes[a].Size;
            }
            return rank;
        }
    }
}

/// <summary>A rank's index inside its tp, cp, dp, pp, dp-cp, ep, expert-tp and expert-dp groups.</summary>
public sealed record RankCoordinates(int Tp, int Cp, int Dp, int Pp, int DpCp, int Ep, int Etp, int Edp);

/// <summary>A run of <c>new_group</c> calls: <see cref="Count"/> groups of family <see cref="GroupsKey"/> from <see cref="FirstIndex"/>.</summary>
public sealed record GroupCreation(string Description, string Backend, string GroupsKey, int FirstIndex, int Count);
