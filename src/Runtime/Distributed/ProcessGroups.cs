using Moe.Dsl.Layout;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Distributed;

/// <summary>
/// Every process group one rank belongs to, under Megatron-Core's names (process_groups_config.py): the
/// object the model, the dispatcher, the data-parallel reducer and the pipeline schedule are handed. Built
/// from one layout — the recipe's generated wiring, or <see cref="RankLayout"/> when the command line changed
/// the topology — by splitting the world communicator once per family, in the layout's communicator-creation
/// order, so every rank issues the same splits in the same order (NCCL's ncclCommSplit is collective).
/// </summary>
/// <remarks>
/// A family whose groups all have one member (tp when Tensor = 1, ...) is a <see cref="SelfCommunicator"/> on
/// every rank and costs no communicator: size-1 parallelism is the identity, so the one-device run is the same
/// code. Nothing here is static: in-process ranks of one process each hold their own ProcessGroups.
/// </remarks>
public sealed class ProcessGroups : IDisposable
{
    /// <summary>The families the runtime uses, by Megatron's keys (the layout also lists ones nothing here needs, e.g. gtp_remat).</summary>
    public static IReadOnlyList<string> UsedFamilies { get; } =
        ["dp_cp", "dp", "cp", "mp", "tp", "pp", "embedding", "tp_dp_cp", "tp_cp", "ep", "expert_tp", "tp_ep", "tp_ep_pp", "expert_dp"];

    private readonly Dictionary<string, Communicator> _groups = new(StringComparer.Ordinal);

    private ProcessGroups(Communicator world, IRankLayout layout)
    {
        World = world;
        Layout = layout;
        Coordinates = layout.Coordinates(world.GlobalRank);
    }

    /// <summary>
    /// Splits <paramref name="world"/> into this rank's groups of <paramref name="layout"/>. Collective over the
    /// world: every rank calls it with the same layout.
    /// </summary>
    public static ProcessGroups Create(Communicator world, IRankLayout layout)
    {
        if (world.Size != layout.World)
            throw new UserError($"The job has {world.Size} ranks but the layout is for {layout.World} GPUs (Parallelism.Gpus); launch {layout.World} processes or pass --gpus {world.Size}.");
        var groups = new ProcessGroups(world, layout);
        int rank = world.GlobalRank;
        var order = layout.CreationOrder.Select(c => c.GroupsKey).Distinct(StringComparer.Ordinal).Where(f => UsedFamilies.Contains(f)).ToList();
        try
        {
            foreach (var family in order)
            {
                int index = layout.GroupIndexOf(family, rank);
                var members = layout.GroupOf(family, rank);
                // A family whose groups equal an earlier family's (dp and dp_cp without context parallel, tp and mp
                // without pipelining, ...) shares its communicator: the same decision on every rank, fewer NCCL
                // communicators (each holds device buffers), and operations stay ordered on one stream.
                string? same = order.TakeWhile(f => f != family).FirstOrDefault(f => SameGroups(layout, f, family));
                if (same is not null)
                {
                    groups._groups[family] = groups._groups[same];
                    continue;
                }
                if (index < 0)
                {
                    // Not a member (the embedding group of a middle pipeline stage): take part in the split, join nothing.
                    world.Split(family, -1, []);
                    continue;
                }
                groups._groups[family] = layout.GroupCount(family) == layout.World
                    ? new SelfCommunicator(family, rank, world.Timeout, world.DeviceForScalars)
                    : world.Split(family, index, members)
                      ?? throw new InvalidOperationException($"Split of {family} returned no group for global rank {rank}.");
                if (!groups._groups[family].Ranks.SequenceEqual(members))
                    throw new InvalidOperationException($"{family}: the backend made group [{string.Join(", ", groups._groups[family].Ranks)}], the layout says [{string.Join(", ", members)}].");
            }
        }
        catch
        {
            groups.Dispose();
            throw;
        }
        return groups;
    }

    /// <summary>Whether two families have the same groups (the same decision on every rank, from the layout alone).</summary>
    private static bool SameGroups(IRankLayout layout, string a, string b)
    {
        int count = layout.GroupCount(a);
        if (count != layout.GroupCount(b)) return false;
        for (int i = 0; i < count; i++)
            if (!layout.Group(a, i).SequenceEqual(layout.Group(b, i))) return false;
        return true;
    }

    /// <summary>All ranks.</summary>
    public Communicator World { get; }

    /// <summary>The layout the groups came from.</summary>
    public IRankLayout Layout { get; }

    /// <summary>This rank's index in its tp, cp, dp, pp, dp-cp, ep, expert-tp and expert-dp groups.</summary>
    public RankCoordinates Coordinates { get; }

    /// <summary>This rank's global rank.</summary>
    public int Rank => World.GlobalRank;

    /// <summary>The group of a family by Megatron's key ("tp", "expert_dp", ...).</summary>
    public Communicator this[string family] => _groups.TryGetValue(family, out var c) ? c
        : throw new KeyNotFoundException($"No process group '{family}'; the runtime creates {string.Join(", ", UsedFamilies)}.");

    /// <summary>Tensor parallel (Megatron TENSOR_MODEL_PARALLEL_GROUP).</summary>
    public Communicator Tp => this["tp"];

    /// <summary>Context parallel.</summary>
    public Communicator Cp => this["cp"];

    /// <summary>Dense data parallel (without context parallel).</summary>
    public Communicator Dp => this["dp"];

    /// <summary>Dense data parallel with context parallel: where dense gradients are reduced.</summary>
    public Communicator DpCp => this["dp_cp"];

    /// <summary>Pipeline parallel.</summary>
    public Communicator Pp => this["pp"];

    /// <summary>Model parallel (tp × pp).</summary>
    public Communicator Mp => this["mp"];

    /// <summary>First and last pipeline stage (tied embeddings).</summary>
    public Communicator Embedding => this["embedding"];

    /// <summary>Tensor × context parallel (where MoE token counts are gathered under sequence parallelism).</summary>
    public Communicator TpCp => this["tp_cp"];

    /// <summary>Tensor × data × context parallel.</summary>
    public Communicator TpDpCp => this["tp_dp_cp"];

    /// <summary>Expert parallel.</summary>
    public Communicator Ep => this["ep"];

    /// <summary>Expert tensor parallel.</summary>
    public Communicator Etp => this["expert_tp"];

    /// <summary>Expert tensor × expert parallel (the all-to-all dispatcher's count exchange).</summary>
    public Communicator TpEp => this["tp_ep"];

    /// <summary>Expert data parallel: where expert gradients are reduced.</summary>
    public Communicator Edp => this["expert_dp"];

    public void Dispose()
    {
        foreach (var c in _groups.Values.Distinct()) c.Dispose();
        _groups.Clear();
    }
}

/// <summary>A group of one rank: every collective is the identity (size-1 parallelism).</summary>
public sealed class SelfCommunicator : Communicator
{
    private readonly Device _device;

    public SelfCommunicator(string name, int globalRank, TimeSpan timeout, Device device) : base(name, [globalRank], 0, timeout) => _device = device;

    public override Device DeviceForScalars => _device;

    public override Communicator? Split(string name, int color, int[] members) => color < 0 ? null : new SelfCommunicator(name, GlobalRank, Timeout, _device);

    protected override void AllReduceCore(Tensor tensor, ReduceOp op, long sequence) { }
    protected override void ReduceScatterCore(Tensor input, Tensor output, ReduceOp op, long sequence) => output.copy_(input);
    protected override void AllGatherCore(Tensor input, Tensor output, long sequence) => output.copy_(input);
    protected override void BroadcastCore(Tensor tensor, int root, long sequence) { }
    protected override void AllToAllCore(Tensor input, long[] sendRows, Tensor output, long[] recvRows, long sequence) => output.copy_(input);
    protected override void ExchangeCore(IReadOnlyList<PeerTransfer> transfers, long sequence) =>
        throw new InvalidOperationException($"{Describe()}: a group of one rank has no peer to exchange with.");
    protected override void BarrierCore(long sequence) { }
}
