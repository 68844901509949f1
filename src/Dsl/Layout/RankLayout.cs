using System;
using System.Collections;
using System.Collections.Generic;
using System.Linq;

namespace Moe.Dsl.Layout;

/// <summary>
/// Megatron-Core 0.20's rank layout (<c>initialize_model_parallel</c>), computed from the strides of its two
/// grids: rank ↔ coordinates, every process-group family in Megatron's enumeration order, and the order in
/// which communicators are created. Defaults as Megatron's: gtp_remat 1, one distributed-optimizer
/// instance, Gloo groups on, no hierarchical context parallel.
/// </summary>
/// <remarks>
/// <para>
/// Two grids share the W ranks and the order string (<see cref="DenseGrid"/>, <see cref="ExpertGrid"/>). A
/// group family is an orthogonal slice of a grid (parallel_state.py, <c>generate_masked_orthogonal_rank_groups</c>):
/// group g's first rank is g written in mixed radix over the axes that do not vary inside the group (first
/// axis least significant), each digit times its axis's stride; member m adds m written likewise over the axes
/// that do. So a rank's group index is its digits on the outside axes read back in that radix, and its index
/// inside the group the same on the inside axes.
/// </para>
/// <para>
/// Nothing is tabulated: construction costs O(number of families), <see cref="Group"/> and
/// <see cref="GroupOf"/> O(group size), <see cref="GroupIndexOf"/> and <see cref="Coordinates"/> O(1), and
/// <see cref="CreationOrder"/> is an index over ~20 segments, so a layout of any world size is cheap to build.
/// </para>
/// </remarks>
public sealed class RankLayout : IRankLayout
{
    private readonly Dictionary<string, Family> _families;
    private readonly Slice _tp, _cp, _dp, _pp, _dpCp, _ep, _expertTp, _expertDp;

    /// <summary>Builds the layout; throws <see cref="ArgumentException"/> for sizes that do not divide (validate with the rule set first).</summary>
    public RankLayout(int world, int tensor, int pipeline, int context, int expert, int expertTensor, RankOrder order)
    {
        if (world < 1 || tensor < 1 || pipeline < 1 || context < 1 || expert < 1 || expertTensor < 1)
            throw new ArgumentException("Every parallel size must be at least 1.");
        if (world % ((long)tensor * pipeline * context) != 0)
            throw new ArgumentException($"World size {world} is not divisible by tp·pp·cp = {(long)tensor * pipeline * context}.");
        if (world % ((long)expertTensor * expert * pipeline) != 0)
            throw new ArgumentException($"World size {world} is not divisible by etp·ep·pp = {(long)expertTensor * expert * pipeline}.");
        if (order != RankOrder.TpCpEpDpPp && order != RankOrder.TpCpEpPpDp)
            throw new ArgumentException($"Rank order {order} is not one of Megatron's two.", nameof(order));
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

        DenseGrid = RankGrid.Of(order, tp: tensor, cp: context, ep: 1, dp: DataParallel, pp: pipeline);
        ExpertGrid = RankGrid.Of(order, tp: expertTensor, cp: 1, ep: expert, dp: ExpertDataParallel, pp: pipeline);

        _tp = new Slice(DenseGrid, "tp");
        _cp = new Slice(DenseGrid, "cp");
        _dp = new Slice(DenseGrid, "dp");
        _dpCp = new Slice(DenseGrid, "dp", "cp");
        _pp = new Slice(DenseGrid, "pp");
        _ep = new Slice(ExpertGrid, "ep");
        _expertTp = new Slice(ExpertGrid, "tp");
        _expertDp = new Slice(ExpertGrid, "dp");
        var tpEpPp = new Slice(ExpertGrid, "tp", "ep", "pp");
        _families = new Dictionary<string, Family>(StringComparer.Ordinal)
        {
            ["tp"] = _tp,
            ["cp"] = _cp,
            ["dp"] = _dp,
            ["dp_cp"] = _dpCp,
            ["pp"] = _pp,
            ["mp"] = new Slice(DenseGrid, "tp", "pp"),
            ["tp_pp"] = new Slice(DenseGrid, "tp", "pp"),
            ["tp_cp"] = new Slice(DenseGrid, "tp", "cp"),
            ["tp_dp"] = new Slice(DenseGrid, "tp", "dp"),
            ["tp_dp_cp"] = new Slice(DenseGrid, "tp", "dp", "cp"),
            // First and last stage of each pipeline (tied embeddings); the position embedding lives on the first.
            ["embedding"] = new PipelineEnds(_pp, DenseGrid["pp"], lastToo: true),
            ["position_embedding"] = new PipelineEnds(_pp, DenseGrid["pp"], lastToo: false),
            ["ep"] = _ep,
            ["expert_tp"] = _expertTp,
            ["expert_dp"] = _expertDp,
            ["tp_ep"] = new Slice(ExpertGrid, "tp", "ep"),
            ["tp_ep_pp"] = tpEpPp,
            // One optimizer instance: all tp-ep-pp groups concatenated, in creation order (torch sorts it on creation).
            ["intra_dist_opt"] = new Concatenation(tpEpPp, world),
            // gtp_remat 1: the slice that varies along no axis, W singletons.
            ["gtp_remat"] = new Slice(DenseGrid),
            ["expert_gtp_remat"] = new Slice(ExpertGrid),
        };
        CreationOrder = new CreationRuns(this);
    }

    /// <summary>
    /// The layout whose grids are <paramref name="dense"/> and <paramref name="expert"/> (a generated wiring
    /// states them); throws <see cref="ArgumentException"/> unless they are Megatron's pair for one set of sizes:
    /// one order, ep 1 in the dense grid, cp 1 in the expert grid, the same pp and the same number of ranks.
    /// </summary>
    public static RankLayout FromGrids(RankGrid dense, RankGrid expert)
    {
        if (dense is null) throw new ArgumentNullException(nameof(dense));
        if (expert is null) throw new ArgumentNullException(nameof(expert));
        if (dense.Order != expert.Order)
            throw new ArgumentException($"The dense grid follows {OrderName(dense.Order)} and the expert grid {OrderName(expert.Order)}; Megatron uses one order for both.");
        if (dense["ep"].Size != 1) throw new ArgumentException($"The dense grid's ep axis has size {dense["ep"].Size}; Megatron's dense grid has ep 1.", nameof(dense));
        if (expert["cp"].Size != 1) throw new ArgumentException($"The expert grid's cp axis has size {expert["cp"].Size}; Megatron's expert grid has cp 1.", nameof(expert));
        if (dense["pp"].Size != expert["pp"].Size)
            throw new ArgumentException($"The dense grid has pp {dense["pp"].Size} and the expert grid pp {expert["pp"].Size}; both grids share the pipeline axis.");
        if (dense.Size != expert.Size)
            throw new ArgumentException($"The dense grid spans {dense.Size} ranks and the expert grid {expert.Size}; both span the world.");
        // The strides are checked by RankGrid, so these sizes give back exactly these two grids.
        return new RankLayout(dense.Size, dense["tp"].Size, dense["pp"].Size, dense["cp"].Size, expert["ep"].Size, expert["tp"].Size, dense.Order);
    }

    /// <inheritdoc />
    public int World { get; }

    /// <inheritdoc />
    public int Tensor { get; }

    /// <inheritdoc />
    public int Pipeline { get; }

    /// <inheritdoc />
    public int Context { get; }

    /// <inheritdoc />
    public int Expert { get; }

    /// <inheritdoc />
    public int ExpertTensor { get; }

    /// <inheritdoc />
    public RankOrder Order { get; }

    /// <inheritdoc />
    public int DataParallel { get; }

    /// <inheritdoc />
    public int ExpertDataParallel { get; }

    /// <summary>The order string, e.g. "tp-cp-ep-dp-pp".</summary>
    public string OrderString => OrderName(Order);

    /// <summary>The dense grid: tp = TP, cp = CP, ep = 1, dp = DP, pp = PP in <see cref="Order"/>.</summary>
    public RankGrid DenseGrid { get; }

    /// <summary>The expert grid: tp = ETP, cp = 1, ep = EP, dp = EDP, pp = PP in <see cref="Order"/>.</summary>
    public RankGrid ExpertGrid { get; }

    /// <inheritdoc />
    public IReadOnlyList<GroupCreation> CreationOrder { get; }

    /// <summary>The group family keys in Megatron's listing order (the keys of its rank vectors).</summary>
    public static IReadOnlyList<string> FamilyKeys { get; } = new[]
    {
        "tp", "cp", "dp", "dp_cp", "pp", "mp", "tp_pp", "tp_cp", "tp_dp", "tp_dp_cp", "embedding", "position_embedding",
        "ep", "expert_tp", "expert_dp", "tp_ep", "tp_ep_pp", "intra_dist_opt", "gtp_remat", "expert_gtp_remat",
    };

    /// <inheritdoc />
    public int GroupCount(string family) => Get(family).Count;

    /// <inheritdoc />
    public int[] Group(string family, int index)
    {
        var f = Get(family);
        if (index < 0 || index >= f.Count)
            throw new ArgumentOutOfRangeException(nameof(index), index, $"Family {family} has {f.Count} groups.");
        return f.Members(index);
    }

    /// <inheritdoc />
    public int GroupIndexOf(string family, int rank)
    {
        var f = Get(family);
        CheckRank(rank);
        return f.IndexOf(rank);
    }

    /// <inheritdoc />
    public int[] GroupOf(string family, int rank)
    {
        int index = GroupIndexOf(family, rank);
        return index < 0 ? Array.Empty<int>() : Get(family).Members(index);
    }

    /// <inheritdoc />
    public RankCoordinates Coordinates(int rank)
    {
        CheckRank(rank);
        return new RankCoordinates(_tp.PositionOf(rank), _cp.PositionOf(rank), _dp.PositionOf(rank), _pp.PositionOf(rank),
            _dpCp.PositionOf(rank), _ep.PositionOf(rank), _expertTp.PositionOf(rank), _expertDp.PositionOf(rank));
    }

    /// <summary>The rank at dense-grid coordinates (tp, cp, dp, pp).</summary>
    public int DenseRank(int tp, int cp, int dp, int pp) =>
        tp * DenseGrid["tp"].Stride + cp * DenseGrid["cp"].Stride + dp * DenseGrid["dp"].Stride + pp * DenseGrid["pp"].Stride;

    /// <summary>The rank at expert-grid coordinates (etp, ep, edp, pp).</summary>
    public int ExpertRank(int etp, int ep, int edp, int pp) =>
        etp * ExpertGrid["tp"].Stride + ep * ExpertGrid["ep"].Stride + edp * ExpertGrid["dp"].Stride + pp * ExpertGrid["pp"].Stride;

    /// <summary>"tp-cp-ep-dp-pp" or "tp-cp-ep-pp-dp".</summary>
    public static string OrderName(RankOrder order) => order == RankOrder.TpCpEpDpPp ? "tp-cp-ep-dp-pp" : "tp-cp-ep-pp-dp";

    /// <summary>Parses an order string; null when it is not one of Megatron's two.</summary>
    public static RankOrder? ParseOrder(string text) => text switch
    {
        "tp-cp-ep-dp-pp" => RankOrder.TpCpEpDpPp,
        "tp-cp-ep-pp-dp" => RankOrder.TpCpEpPpDp,
        _ => null,
    };

    /// <summary>The exception for a family key that is not one of <see cref="FamilyKeys"/>.</summary>
    internal static ArgumentException UnknownFamily(string? family) =>
        new($"'{family}' is not a Megatron group family; the families are {string.Join(", ", FamilyKeys)}.", nameof(family));

    private Family Get(string family) =>
        family is not null && _families.TryGetValue(family, out var f) ? f : throw UnknownFamily(family);

    private void CheckRank(int rank)
    {
        if (rank < 0 || rank >= World) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"Ranks are 0 to {World - 1}.");
    }

    /// <summary>A group family: its groups by index, and which group holds a rank (−1: none).</summary>
    private abstract class Family
    {
        public abstract int Count { get; }

        public abstract int[] Members(int index);

        public abstract int IndexOf(int rank);
    }

    /// <summary>The groups varying along some axes of a grid; axes of size 1 are dropped, they add nothing.</summary>
    private sealed class Slice : Family
    {
        private readonly int[] _insideSizes, _insideStrides, _outsideSizes, _outsideStrides;
        private readonly int _size, _count;

        public Slice(RankGrid grid, params string[] inside)
        {
            var axes = grid.Axes.Where(a => a.Size > 1).ToArray();
            var vary = axes.Where(a => inside.Contains(a.Name)).ToArray();
            var fixedAxes = axes.Where(a => !inside.Contains(a.Name)).ToArray();
            _insideSizes = vary.Select(a => a.Size).ToArray();
            _insideStrides = vary.Select(a => a.Stride).ToArray();
            _outsideSizes = fixedAxes.Select(a => a.Size).ToArray();
            _outsideStrides = fixedAxes.Select(a => a.Stride).ToArray();
            _size = _insideSizes.Aggregate(1, (p, s) => p * s);
            _count = grid.Size / _size;
        }

        public override int Count => _count;

        public override int[] Members(int index)
        {
            int baseRank = Expand(index, _outsideSizes, _outsideStrides);
            var members = new int[_size];
            for (int m = 0; m < members.Length; m++) members[m] = baseRank + Expand(m, _insideSizes, _insideStrides);
            return members;
        }

        public override int IndexOf(int rank) => Digits(rank, _outsideSizes, _outsideStrides);

        /// <summary>The rank's index inside its group: its digits on the varying axes.</summary>
        public int PositionOf(int rank) => Digits(rank, _insideSizes, _insideStrides);

        /// <summary>index in mixed radix over <paramref name="sizes"/> (first digit least significant) → Σ digit · stride.</summary>
        private static int Expand(int index, int[] sizes, int[] strides)
        {
            int rank = 0;
            for (int a = 0; a < sizes.Length; a++)
            {
                rank += index % sizes[a] * strides[a];
                index /= sizes[a];
            }
            return rank;
        }

        /// <summary>The inverse on these axes: the rank's coordinates along them, read as one mixed-radix number.</summary>
        private static int Digits(int rank, int[] sizes, int[] strides)
        {
            int index = 0, weight = 1;
            for (int a = 0; a < sizes.Length; a++)
            {
                index += rank / strides[a] % sizes[a] * weight;
                weight *= sizes[a];
            }
            return index;
        }
    }

    /// <summary>Embedding groups: the first (and last) stage of each pipeline group, numbered as the pipeline groups.</summary>
    private sealed class PipelineEnds : Family
    {
        private readonly Slice _pipelines;
        private readonly GridAxis _pp;
        private readonly bool _lastToo;

        public PipelineEnds(Slice pipelines, GridAxis pp, bool lastToo)
        {
            _pipelines = pipelines;
            _pp = pp;
            _lastToo = lastToo;
        }

        public override int Count => _pipelines.Count;

        public override int[] Members(int index)
        {
            int first = _pipelines.Members(index)[0];
            return _lastToo && _pp.Size > 1 ? new[] { first, first + (_pp.Size - 1) * _pp.Stride } : new[] { first };
        }

        public override int IndexOf(int rank)
        {
            int stage = rank / _pp.Stride % _pp.Size;
            return stage == 0 || (_lastToo && stage == _pp.Size - 1) ? _pipelines.IndexOf(rank) : -1;
        }
    }

    /// <summary>intra_dist_opt with one optimizer instance: one group, the tp-ep-pp groups one after the other.</summary>
    private sealed class Concatenation : Family
    {
        private readonly Slice _parts;
        private readonly int _world;

        public Concatenation(Slice parts, int world)
        {
            _parts = parts;
            _world = world;
        }

        public override int Count => 1;

        public override int[] Members(int index)
        {
            var members = new int[_world];
            int at = 0;
            for (int g = 0; g < _parts.Count; g++)
            {
                var part = _parts.Members(g);
                Array.Copy(part, 0, members, at, part.Length);
                at += part.Length;
            }
            return members;
        }

        public override int IndexOf(int rank) => 0;
    }

    /// <summary>
    /// parallel_state.py's <c>new_group</c> calls as runs, computed per index: a family created in one loop is one
    /// run; a family with Gloo twins alternates NCCL and Gloo runs of one group; the pipeline loop creates pipeline,
    /// embedding and position-embedding group i in turn (§2.3 of the spec).
    /// </summary>
    private sealed class CreationRuns : IReadOnlyList<GroupCreation>
    {
        private readonly List<(int Start, int Length, Func<int, GroupCreation> At)> _segments = new();

        public CreationRuns(RankLayout layout)
        {
            void All(string desc, string key)
            {
                int count = layout.GroupCount(key);
                Add(1, _ => new GroupCreation(desc, "nccl", key, 0, count));
            }
            void WithGloo(string desc, string key) => Add(2 * layout.GroupCount(key), i =>
                i % 2 == 0 ? new GroupCreation(desc, "nccl", key, i / 2, 1) : new GroupCreation(desc + "_GLOO", "gloo", key, i / 2, 1));

            All("GTP_WEIGHT_REMAT_GROUP", "gtp_remat");
            WithGloo("DATA_PARALLEL_GROUP_WITH_CP", "dp_cp");
            WithGloo("DATA_PARALLEL_GROUP", "dp");
            All("CONTEXT_PARALLEL_GROUP", "cp");
            All("MODEL_PARALLEL_GROUP", "mp");
            All("TENSOR_MODEL_PARALLEL_GROUP", "tp");
            Add(3 * layout.GroupCount("pp"), i => (i % 3) switch
            {
                0 => new GroupCreation("PIPELINE_MODEL_PARALLEL_GROUP", "nccl", "pp", i / 3, 1),
                1 => new GroupCreation("EMBEDDING_GROUP", "nccl", "embedding", i / 3, 1),
                _ => new GroupCreation("POSITION_EMBEDDING_GROUP", "nccl", "position_embedding", i / 3, 1),
            });
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
        }

        public int Count { get; private set; }

        public GroupCreation this[int index]
        {
            get
            {
                if (index < 0 || index >= Count) throw new ArgumentOutOfRangeException(nameof(index), index, $"There are {Count} creation runs.");
                int lo = 0, hi = _segments.Count - 1;
                while (lo < hi)
                {
                    int mid = (lo + hi + 1) / 2;
                    if (_segments[mid].Start <= index) lo = mid;
                    else hi = mid - 1;
                }
                var s = _segments[lo];
                return s.At(index - s.Start);
            }
        }

        public IEnumerator<GroupCreation> GetEnumerator()
        {
            foreach (var s in _segments)
                for (int i = 0; i < s.Length; i++) yield return s.At(i);
        }

        IEnumerator IEnumerable.GetEnumerator() => GetEnumerator();

        private void Add(int length, Func<int, GroupCreation> at)
        {
            _segments.Add((Count, length, at));
            Count += length;
        }
    }
}
