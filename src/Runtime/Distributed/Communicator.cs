using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Distributed;

/// <summary>How a reduction combines the ranks' values (NCCL's ncclRedOp_t).</summary>
public enum ReduceOp
{
    Sum,
    Avg,
    Max,
    Min,
}

/// <summary>One point-to-point transfer of a batched exchange: send <see cref="Tensor"/> to, or receive into it from, <see cref="Peer"/>.</summary>
/// <param name="Send">True to send, false to receive.</param>
/// <param name="Tensor">A contiguous tensor: the data to send, or the buffer that receives (its shape must match the sender's).</param>
/// <param name="Peer">The peer's index in the communicator's group.</param>
public sealed record PeerTransfer(bool Send, Tensor Tensor, int Peer);

/// <summary>
/// The ranks of one process group (a Megatron group such as tp or expert_dp) and the collectives over them,
/// the shape of torch.distributed's ProcessGroup and of an NCCL communicator. Two backends implement it:
/// NCCL (one process per GPU) and in-process (one thread per rank, CPU tensors) for tests and
/// <c>train --simulate</c>.
/// </summary>
/// <remarks>
/// <para>
/// Every operation is collective over the group: each member calls the same operations in the same order
/// with matching shapes. Tensors are contiguous; results are written into the given tensors (in place for
/// all-reduce and broadcast). Operations along a dimension work on dimension 0, so a rank's share of a
/// gathered or scattered tensor is a contiguous block.
/// </para>
/// <para>
/// Every operation has a deadline (<see cref="Timeout"/>): when it passes, the backend aborts and throws a
/// <see cref="CollectiveTimeoutException"/> naming the group, its ranks, the operation, its sequence number
/// in the group and how long it waited, instead of hanging. <see cref="Recent"/> keeps the last operations for
/// such reports.
/// </para>
/// </remarks>
public abstract class Communicator : IDisposable
{
    private readonly Queue<CollectiveRecord> _recent = new();
    private long _sequence;
    private long _transferSequence;
    private long _ticks;

    protected Communicator(string name, int[] ranks, int rank, TimeSpan timeout)
    {
        Name = name;
        Ranks = ranks;
        Rank = rank;
        Timeout = timeout;
    }

    /// <summary>The group's family ("tp", "expert_dp", "world", ...).</summary>
    public string Name { get; }

    /// <summary>Global ranks of the members, in group order.</summary>
    public int[] Ranks { get; }

    /// <summary>This rank's index in the group.</summary>
    public int Rank { get; }

    /// <summary>Members of the group.</summary>
    public int Size => Ranks.Length;

    /// <summary>This rank's global rank.</summary>
    public int GlobalRank => Ranks[Rank];

    /// <summary>How long an operation may wait for the other members.</summary>
    public TimeSpan Timeout { get; }

    /// <summary>"tp [0, 1]": the group as reports name it.</summary>
    public string Describe() => $"{Name} [{string.Join(", ", Ranks)}]";

    /// <summary>The most recent operations of this rank in this group (oldest first).</summary>
    public IReadOnlyList<CollectiveRecord> Recent
    {
        get { lock (_recent) return _recent.ToArray(); }
    }

    /// <summary>Sums (or averages, ...) <paramref name="tensor"/> over the group, in place on every member.</summary>
    public void AllReduce(Tensor tensor, ReduceOp op = ReduceOp.Sum)
    {
        if (Size == 1) return;   // the sum, average, max or min of one value is itself
        Run("all_reduce", tensor, seq => AllReduceCore(tensor, op, seq));
    }

    /// <summary>
    /// Reduces <paramref name="input"/> (Size·n rows along dim 0) over the group; member i receives rows
    /// [i·n, (i+1)·n) of the result in <paramref name="output"/> (n rows).
    /// </summary>
    public void ReduceScatter(Tensor input, Tensor output, ReduceOp op = ReduceOp.Sum)
    {
        CheckBlocks(input, output, "reduce_scatter");
        if (Size == 1) { output.copy_(input); return; }
        Run("reduce_scatter", input, seq => ReduceScatterCore(input, output, op, seq));
    }

    /// <summary>
    /// Starts <see cref="AllReduce"/> without making the compute stream wait for it: <see cref="CollectiveHandle.Wait"/>
    /// does that (Megatron's async_op=True for --overlap-grad-reduce). It takes its place in the group's order of
    /// operations when it is called, as any other operation; the tensor must stay alive and untouched until Wait.
    /// </summary>
    public CollectiveHandle AllReduceAsync(Tensor tensor, ReduceOp op = ReduceOp.Sum)
    {
        if (Size == 1) return CollectiveHandle.Completed;
        CollectiveHandle? handle = null;
        Run("all_reduce", tensor, seq => handle = AllReduceAsyncCore(tensor, op, seq));
        return handle!;
    }

    /// <summary>
    /// Starts <see cref="ReduceScatter"/> without making the compute stream wait for it: <see cref="CollectiveHandle.Wait"/>
    /// does that. Ordered among the group's operations by the call, as <see cref="AllReduceAsync"/>.
    /// </summary>
    public CollectiveHandle ReduceScatterAsync(Tensor input, Tensor output, ReduceOp op = ReduceOp.Sum)
    {
        CheckBlocks(input, output, "reduce_scatter");
        if (Size == 1) { output.copy_(input); return CollectiveHandle.Completed; }
        CollectiveHandle? handle = null;
        Run("reduce_scatter", input, seq => handle = ReduceScatterAsyncCore(input, output, op, seq));
        return handle!;
    }

    /// <summary>Concatenates every member's <paramref name="input"/> (n rows) along dim 0 into <paramref name="output"/> (Size·n rows), in rank order.</summary>
    public void AllGather(Tensor input, Tensor output)
    {
        CheckBlocks(output, input, "all_gather");
        if (Size == 1) { output.copy_(input); return; }
        Run("all_gather", input, seq => AllGatherCore(input, output, seq));
    }

    /// <summary>Copies member <paramref name="root"/>'s <paramref name="tensor"/> into every member's.</summary>
    public void Broadcast(Tensor tensor, int root)
    {
        if ((uint)root >= (uint)Size) throw new ArgumentOutOfRangeException(nameof(root), $"{Describe()}: root {root} is not a member index.");
        if (Size == 1) return;
        Run("broadcast", tensor, seq => BroadcastCore(tensor, root, seq));
    }

    /// <summary>
    /// All-to-all with uneven splits along dim 0: rows [Σ send[..j], +send[j]) of <paramref name="input"/> go to member j;
    /// <paramref name="output"/> holds, in member order, recv[j] rows from each member j. Every pair must agree:
    /// what i sends to j is what j expects from i (the caller exchanges the counts first).
    /// </summary>
    public void AllToAll(Tensor input, long[] sendRows, Tensor output, long[] recvRows)
    {
        if (sendRows.Length != Size || recvRows.Length != Size)
            throw new ArgumentException($"{Describe()}: all_to_all needs one split per member ({Size}), got {sendRows.Length} and {recvRows.Length}.");
        if (sendRows.Sum() != input.shape[0] || recvRows.Sum() != output.shape[0])
            throw new ArgumentException($"{Describe()}: all_to_all splits sum to {sendRows.Sum()} / {recvRows.Sum()} rows but the tensors have {input.shape[0]} / {output.shape[0]}.");
        if (Size == 1) { output.copy_(input); return; }
        Run("all_to_all", input, seq => AllToAllCore(input, sendRows, output, recvRows, seq));
    }

    /// <summary>
    /// Point-to-point transfers issued together (NCCL group semantics: no ordering deadlock between the sends
    /// and receives of one batch). Pipeline stages exchange activations and gradients this way.
    /// </summary>
    public void Exchange(IReadOnlyList<PeerTransfer> transfers)
    {
        if (transfers.Count == 0) return;
        foreach (var t in transfers)
            if ((uint)t.Peer >= (uint)Size || t.Peer == Rank)
                throw new ArgumentException($"{Describe()}: peer {t.Peer} is not another member of the group.");
        Run("send_recv", transfers[0].Tensor, seq => ExchangeCore(transfers, seq), pointToPoint: true);
    }

    /// <summary>Waits until every member has reached this point.</summary>
    public void Barrier()
    {
        if (Size == 1) return;
        Run("barrier", null, BarrierCore);
    }

    /// <summary>Every member's <paramref name="value"/>: result[j] is member j's (a small all-gather through the device).</summary>
    public long[] AllGatherScalars(long value)
    {
        using var mine = torch.tensor(new[] { value }, device: DeviceForScalars);
        using var all = torch.zeros(Size, dtype: ScalarType.Int64, device: DeviceForScalars);
        AllGather(mine, all);
        return all.cpu().data<long>().ToArray();
    }

    /// <summary>The device small host-visible exchanges use (CPU for in-process, the rank's GPU for NCCL).</summary>
    public abstract Device DeviceForScalars { get; }

    /// <summary>
    /// This rank's sub-group: members passing the same <paramref name="color"/> form one group, ordered as
    /// <paramref name="members"/> (its global ranks, this rank among them) lists them — the caller's layout knows
    /// the groups, the backend checks or trusts it. Collective over this communicator (NCCL's ncclCommSplit, with
    /// the index in <paramref name="members"/> as key); a negative colour takes part without joining and gets null.
    /// </summary>
    public abstract Communicator? Split(string name, int color, int[] members);

    protected abstract void AllReduceCore(Tensor tensor, ReduceOp op, long sequence);
    protected abstract void ReduceScatterCore(Tensor input, Tensor output, ReduceOp op, long sequence);
    protected abstract void AllGatherCore(Tensor input, Tensor output, long sequence);
    protected abstract void BroadcastCore(Tensor tensor, int root, long sequence);
    protected abstract void AllToAllCore(Tensor input, long[] sendRows, Tensor output, long[] recvRows, long sequence);
    protected abstract void ExchangeCore(IReadOnlyList<PeerTransfer> transfers, long sequence);
    protected abstract void BarrierCore(long sequence);

    /// <summary>
    /// The asynchronous all-reduce; by default it runs synchronously (the in-process backend: its ranks are threads,
    /// the result is there when the call returns) and the handle's Wait does nothing.
    /// </summary>
    protected virtual CollectiveHandle AllReduceAsyncCore(Tensor tensor, ReduceOp op, long sequence)
    {
        AllReduceCore(tensor, op, sequence);
        return CollectiveHandle.Completed;
    }

    /// <summary>The asynchronous reduce-scatter; synchronous by default, as <see cref="AllReduceAsyncCore"/>.</summary>
    protected virtual CollectiveHandle ReduceScatterAsyncCore(Tensor input, Tensor output, ReduceOp op, long sequence)
    {
        ReduceScatterCore(input, output, op, sequence);
        return CollectiveHandle.Completed;
    }

    private void CheckBlocks(Tensor whole, Tensor block, string op)
    {
        if (whole.shape.Length == 0 || block.shape.Length == 0 || whole.shape[0] != block.shape[0] * Size
            || !whole.shape.Skip(1).SequenceEqual(block.shape.Skip(1)) || whole.dtype != block.dtype)
            throw new ArgumentException($"{Describe()}: {op} needs [{Size}·n, …] and [n, …] of one dtype, got [{string.Join(", ", whole.shape)}] {whole.dtype} and [{string.Join(", ", block.shape)}] {block.dtype}.");
        if (!whole.is_contiguous() || !block.is_contiguous())
            throw new ArgumentException($"{Describe()}: {op} needs contiguous tensors.");
    }

    /// <summary>
    /// Numbers and records the operation, then runs it. Collectives and point-to-point transfers are numbered
    /// apart: every member issues the same collectives in the same order, but transfers involve only pairs.
    /// </summary>
    private void Run(string op, Tensor? tensor, Action<long> body, bool pointToPoint = false)
    {
        long sequence = Interlocked.Increment(ref pointToPoint ? ref _transferSequence : ref _sequence);
        var record = new CollectiveRecord(sequence, op, tensor is null ? "" : $"{tensor.dtype}[{string.Join(", ", tensor.shape)}]", DateTime.UtcNow);
        lock (_recent)
        {
            _recent.Enqueue(record);
            while (_recent.Count > 16) _recent.Dequeue();
        }
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        body(sequence);
        Interlocked.Add(ref _ticks, System.Diagnostics.Stopwatch.GetTimestamp() - start);
    }

    /// <summary>
    /// Whether <see cref="TakeSeconds"/> measures communication: false for the in-process backend, whose ranks are
    /// threads sharing a few cores, so a call's time is mostly waiting for the other threads to be scheduled.
    /// </summary>
    public virtual bool MeasuresTime => true;

    /// <summary>
    /// Seconds this rank spent in the group's operations since the last call (and resets the count): the time
    /// the expert all-to-all takes out of a step. The in-process backend measures the calls; NCCL measures the
    /// operations on its stream.
    /// </summary>
    public virtual double TakeSeconds() => Interlocked.Exchange(ref _ticks, 0) / (double)System.Diagnostics.Stopwatch.Frequency;

    /// <summary>Releases the backend's resources for this group.</summary>
    public virtual void Dispose() => GC.SuppressFinalize(this);
}

/// <summary>
/// An operation started by <see cref="Communicator.AllReduceAsync"/> or <see cref="Communicator.ReduceScatterAsync"/>
/// (torch.distributed's Work). <see cref="Wait"/> makes the compute stream — libtorch's, where every later kernel runs —
/// wait for the operation; the host does not block. Its deadline is the group's, watched from the moment it starts.
/// </summary>
public abstract class CollectiveHandle
{
    /// <summary>A handle of an operation already complete (size-1 groups, synchronous backends): Wait does nothing.</summary>
    public static readonly CollectiveHandle Completed = new CompletedHandle();

    /// <summary>Makes the compute stream wait for the operation (its outputs are then ready for later kernels). Idempotent.</summary>
    public abstract void Wait();

    private sealed class CompletedHandle : CollectiveHandle
    {
        public override void Wait() { }
    }
}

/// <summary>One operation a rank issued in a group, for hang reports.</summary>
/// <param name="Sequence">1 for the group's first operation on this rank, and so on.</param>
/// <param name="Operation">all_reduce, all_to_all, ...</param>
/// <param name="Shape">The tensor's dtype and shape.</param>
/// <param name="Started">When the rank issued it.</param>
public sealed record CollectiveRecord(long Sequence, string Operation, string Shape, DateTime Started);

/// <summary>
/// A collective did not complete within its deadline: a member never arrived (crashed, stopped, or issuing a
/// different sequence of operations) or the transport failed. The message names the group, its ranks, the
/// operation, its sequence number and how long this rank waited.
/// </summary>
public sealed class CollectiveTimeoutException : Exception
{
    public CollectiveTimeoutException(string message) : base(message) { }
}
