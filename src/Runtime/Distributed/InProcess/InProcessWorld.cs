using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Distributed.InProcess;

/// <summary>
/// W ranks as W threads of one process, exchanging CPU tensors through shared memory: the backend of the CPU
/// tests and of <c>train --simulate</c>, which runs a recipe's exact topology (32 ranks for the 8x22B recipe)
/// on a laptop. Semantics follow NCCL's: collectives are matched by their order within each group, and a
/// collective whose members never all arrive fails at its deadline instead of hanging.
/// </summary>
/// <remarks>
/// <para>
/// Each collective is an exchange: every member deposits a copy of its input, waits until all have, computes
/// its own result from all inputs in member order (so every member gets bit-identical sums, as ranks of a
/// real job must), and leaves. The members must call the same operation with matching shapes: a mismatch is
/// reported at once, naming what each member called — a bug that NCCL would turn into a hang or garbage.
/// </para>
/// <para>
/// <see cref="Abort"/> (called when a rank's thread fails, or when a deadline passes) wakes every waiting
/// member, each of which then throws with its own report; the world cannot be used after that.
/// </para>
/// </remarks>
public sealed class InProcessWorld
{
    private readonly Dictionary<string, Group> _groups = new(StringComparer.Ordinal);
    private volatile string? _abortReason;

    public InProcessWorld(int size, TimeSpan timeout)
    {
        if (size < 1) throw new ArgumentOutOfRangeException(nameof(size));
        Size = size;
        Timeout = timeout;
    }

    /// <summary>Number of ranks.</summary>
    public int Size { get; }

    /// <summary>Deadline of every operation.</summary>
    public TimeSpan Timeout { get; }

    /// <summary>Why the world was aborted, or null.</summary>
    public string? AbortReason => _abortReason;

    /// <summary>The world communicator of <paramref name="rank"/> (group "world", all ranks).</summary>
    public Communicator Communicator(int rank)
    {
        if ((uint)rank >= (uint)Size) throw new ArgumentOutOfRangeException(nameof(rank));
        return new InProcessCommunicator(this, "world", Enumerable.Range(0, Size).ToArray(), rank);
    }

    /// <summary>Stops the world: every member waiting in, or later entering, an operation throws, naming <paramref name="reason"/>.</summary>
    public void Abort(string reason)
    {
        Interlocked.CompareExchange(ref _abortReason, reason, null);
        Group[] groups;
        lock (_groups) groups = _groups.Values.ToArray();
        foreach (var g in groups)
            lock (g) Monitor.PulseAll(g);
    }

    internal Group GroupOf(string name, int[] ranks)
    {
        string key = name + ":" + string.Join(",", ranks);
        lock (_groups)
        {
            if (!_groups.TryGetValue(key, out var g)) _groups[key] = g = new Group(ranks.Length);
            return g;
        }
    }

    /// <summary>Shared state of one group: the pending collective exchanges and the point-to-point mailboxes.</summary>
    internal sealed class Group
    {
        public Group(int size) => Size = size;

        public int Size { get; }
        public Dictionary<long, Exchange> Exchanges { get; } = new();
        public Dictionary<(int From, int To), Queue<Tensor>> Mailboxes { get; } = new();
    }

    /// <summary>One collective in flight: what each member brought.</summary>
    internal sealed class Exchange
    {
        public Exchange(int size)
        {
            Payloads = new object?[size];
            Signatures = new string?[size];
        }

        public object?[] Payloads { get; }
        public string?[] Signatures { get; }
        public int Arrived { get; set; }
        public int Departed { get; set; }
    }
}

/// <summary>One rank's view of a group in an <see cref="InProcessWorld"/>.</summary>
internal sealed class InProcessCommunicator : Communicator
{
    private readonly InProcessWorld _world;
    private readonly InProcessWorld.Group _group;

    public InProcessCommunicator(InProcessWorld world, string name, int[] ranks, int rank)
        : base(name, ranks, rank, world.Timeout)
    {
        _world = world;
        _group = world.GroupOf(name, ranks);
    }

    public override Device DeviceForScalars => CPU;

    public override bool MeasuresTime => false;

    public override Communicator? Split(string name, int color, int[] members)
    {
        int key = color < 0 ? -1 : Array.IndexOf(members, GlobalRank);
        if (color >= 0 && key < 0) throw new ArgumentException($"{Describe()}: split {name}: global rank {GlobalRank} is not among the members [{string.Join(", ", members)}].");
        int[]? formed = null;
        Collect("split", $"split {name}", (color, key), -Interlocked.Increment(ref _splitSequence), all =>
        {
            if (color < 0) return;
            formed = Enumerable.Range(0, Size)
                .Select(i => (Member: i, Pair: ((int Color, int Key))all[i]!))
                .Where(x => x.Pair.Color == color)
                .OrderBy(x => x.Pair.Key).ThenBy(x => x.Member)
                .Select(x => Ranks[x.Member]).ToArray();
        });
        if (formed is null) return null;
        if (!formed.SequenceEqual(members))
            throw new InvalidOperationException($"{Describe()}: split {name} formed [{string.Join(", ", formed)}] for global rank {GlobalRank}, which expected [{string.Join(", ", members)}]: the ranks disagree about the layout.");
        return new InProcessCommunicator(_world, name, formed, Array.IndexOf(formed, GlobalRank));
    }

    protected override void AllReduceCore(Tensor tensor, ReduceOp op, long sequence) =>
        Collect("all_reduce", Signature("all_reduce", tensor, op.ToString()), Copy(tensor), sequence, all =>
        {
            using var scope = torch.NewDisposeScope();
            tensor.copy_(Reduce(all.Select(t => (Tensor)t!).ToArray(), op));
        });

    protected override void ReduceScatterCore(Tensor input, Tensor output, ReduceOp op, long sequence) =>
        Collect("reduce_scatter", Signature("reduce_scatter", input, op.ToString()), Copy(input), sequence, all =>
        {
            using var scope = torch.NewDisposeScope();
            long n = output.shape[0];
            output.copy_(Reduce(all.Select(t => ((Tensor)t!).narrow(0, Rank * n, n)).ToArray(), op));
        });

    protected override void AllGatherCore(Tensor input, Tensor output, long sequence) =>
        Collect("all_gather", Signature("all_gather", input), Copy(input), sequence, all =>
        {
            using var scope = torch.NewDisposeScope();
            output.copy_(torch.cat(all.Select(t => (Tensor)t!).ToArray(), 0));
        });

    protected override void BroadcastCore(Tensor tensor, int root, long sequence) =>
        Collect("broadcast", Signature("broadcast", tensor, $"root {root}"), Rank == root ? Copy(tensor) : null, sequence, all =>
        {
            if (Rank != root) tensor.copy_((Tensor)all[root]!);
        });

    protected override void AllToAllCore(Tensor input, long[] sendRows, Tensor output, long[] recvRows, long sequence) =>
        Collect("all_to_all", $"all_to_all {input.dtype}[…, {string.Join(", ", input.shape.Skip(1))}]", (Copy(input), sendRows), sequence, all =>
        {
            using var scope = torch.NewDisposeScope();
            var pieces = new Tensor[Size];
            for (int j = 0; j < Size; j++)
            {
                var (theirs, theirSplits) = ((Tensor, long[]))all[j]!;
                if (theirSplits[Rank] != recvRows[j])
                    throw new InvalidOperationException($"{Describe()}: all_to_all #{sequence}: member {j} sends {theirSplits[Rank]} rows to member {Rank}, which expects {recvRows[j]}; exchange the counts first.");
                pieces[j] = theirs.narrow(0, theirSplits.Take(Rank).Sum(), recvRows[j]);
            }
            output.copy_(torch.cat(pieces, 0));
        });

    protected override void ExchangeCore(IReadOnlyList<PeerTransfer> transfers, long sequence)
    {
        var watch = Stopwatch.StartNew();
        lock (_group)
        {
            foreach (var t in transfers.Where(t => t.Send))
            {
                var key = (Rank, t.Peer);
                if (!_group.Mailboxes.TryGetValue(key, out var box)) _group.Mailboxes[key] = box = new Queue<Tensor>();
                box.Enqueue(Copy(t.Tensor));
            }
            Monitor.PulseAll(_group);
            foreach (var t in transfers.Where(t => !t.Send))
            {
                var key = (t.Peer, Rank);
                while (!_group.Mailboxes.TryGetValue(key, out var box) || box.Count == 0)
                    WaitOrFail(watch, "send_recv", sequence, $"nothing from member {t.Peer} (global rank {Ranks[t.Peer]}) yet");
                using var received = _group.Mailboxes[key].Dequeue();
                if (!received.shape.SequenceEqual(t.Tensor.shape) || received.dtype != t.Tensor.dtype)
                    throw new InvalidOperationException($"{Describe()}: member {t.Peer} sent {received.dtype}[{string.Join(", ", received.shape)}] to member {Rank}, which receives into {t.Tensor.dtype}[{string.Join(", ", t.Tensor.shape)}].");
                t.Tensor.copy_(received);
            }
        }
    }

    protected override void BarrierCore(long sequence) => Collect("barrier", "barrier", null, sequence, _ => { });

    private static Tensor Copy(Tensor t) => t.detach().cpu().clone().DetachFromDisposeScope();

    private static string Signature(string op, Tensor t, string extra = "") =>
        $"{op} {t.dtype}[{string.Join(", ", t.shape)}]" + (extra.Length > 0 ? " " + extra : "");

    /// <summary>Combines the members' tensors in member order, so every member computes the same bits.</summary>
    private static Tensor Reduce(Tensor[] all, ReduceOp op)
    {
        var acc = all[0].clone();
        for (int i = 1; i < all.Length; i++)
        {
            switch (op)
            {
                case ReduceOp.Max: acc = torch.maximum(acc, all[i]); break;
                case ReduceOp.Min: acc = torch.minimum(acc, all[i]); break;
                default: acc.add_(all[i]); break;
            }
        }
        if (op == ReduceOp.Avg) acc.div_(all.Length);
        return acc;
    }

    private long _splitSequence;

    /// <summary>
    /// Deposits this member's payload for the group's operation number <paramref name="sequence"/>, waits for
    /// everyone's, hands them to <paramref name="use"/> (outside the lock), and leaves; the last member to leave
    /// releases the payloads, so none is disposed while another member still reads it.
    /// </summary>
    private void Collect(string op, string signature, object? payload, long sequence, Action<object?[]> use)
    {
        InProcessWorld.Exchange x;
        var watch = Stopwatch.StartNew();
        lock (_group)
        {
            if (!_group.Exchanges.TryGetValue(sequence, out x!)) _group.Exchanges[sequence] = x = new InProcessWorld.Exchange(Size);
            x.Payloads[Rank] = payload;
            x.Signatures[Rank] = signature;
            x.Arrived++;
            Monitor.PulseAll(_group);
            while (x.Arrived < Size)
            {
                var missing = Enumerable.Range(0, Size).Where(i => x.Signatures[i] is null).Select(i => Ranks[i]);
                WaitOrFail(watch, op, sequence, $"global rank(s) {string.Join(", ", missing)} never arrived");
            }
        }
        try
        {
            if (x.Signatures.Distinct(StringComparer.Ordinal).Count() > 1)
                throw new InvalidOperationException($"{Describe()}: operation #{sequence} does not match across members: " +
                    string.Join("; ", x.Signatures.Select((s, i) => $"global rank {Ranks[i]} called {s}")));
            use(x.Payloads);
        }
        finally
        {
            lock (_group)
            {
                if (++x.Departed == Size)
                {
                    _group.Exchanges.Remove(sequence);
                    foreach (var p in x.Payloads) Release(p);
                }
            }
        }
    }

    /// <summary>Payload tensors are released by the last member to leave.</summary>
    private static void Release(object? payload)
    {
        switch (payload)
        {
            case Tensor t: t.Dispose(); break;
            case (Tensor t, long[] _): t.Dispose(); break;
        }
    }

    /// <summary>Waits for a pulse on the group; throws when the world was aborted or the deadline passed (and then aborts the world).</summary>
    private void WaitOrFail(Stopwatch watch, string op, long sequence, string state)
    {
        if (_world.AbortReason is string reason)
            throw new CollectiveTimeoutException(Report(op, sequence, watch.Elapsed, state) + $" The job was aborted: {reason}");
        var left = Timeout - watch.Elapsed;
        if (left <= TimeSpan.Zero)
        {
            string report = Report(op, sequence, watch.Elapsed, state);
            _world.Abort($"global rank {GlobalRank}'s deadline passed in {Describe()} {op} #{sequence}");
            throw new CollectiveTimeoutException(report + $" The deadline ({Timeout.TotalSeconds:0.###} s) passed; the job was aborted.");
        }
        Monitor.Wait(_group, left < TimeSpan.FromSeconds(1) ? left : TimeSpan.FromSeconds(1));
    }

    private string Report(string op, long sequence, TimeSpan waited, string state) =>
        $"global rank {GlobalRank}: {op} #{(sequence < 0 ? "split" : sequence.ToString(System.Globalization.CultureInfo.InvariantCulture))} in group {Describe()} waited {waited.TotalSeconds:0.0} s: {state}.";
}
