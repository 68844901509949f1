using System.Diagnostics;
using Moe.Runtime.Devices;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Distributed.Nccl;

/// <summary>
/// A process group over an NCCL communicator. Tensors are passed by device pointer (libtorch's data_ptr, through
/// TorchSharp's native library); they must be contiguous CUDA tensors. Operations are queued on the session's
/// stream in issue order and ordered against libtorch's stream by events (<see cref="NcclSession"/>).
/// </summary>
public sealed unsafe class NcclCommunicator : Communicator
{
    private readonly NcclSession _session;
    private IntPtr _comm;

    internal NcclCommunicator(NcclSession session, IntPtr comm, string name, int[] ranks, int rank)
        : base(name, ranks, rank, session.Timeout)
    {
        _session = session;
        _comm = comm;
    }

    internal IntPtr Handle => _comm;

    private NcclNative Native => _session.Native;

    public override Device DeviceForScalars => _session.Device;

    public override unsafe Communicator? Split(string name, int color, int[] members)
    {
        int key = color < 0 ? 0 : Array.IndexOf(members, GlobalRank);
        if (color >= 0 && key < 0) throw new ArgumentException($"{Describe()}: split {name}: global rank {GlobalRank} is not among the members [{string.Join(", ", members)}].");
        var config = NcclConfig.Create();
        IntPtr child;
        var watch = Stopwatch.StartNew();
        Native.Check(Native.CommSplit(_comm, color < 0 ? -1 : color, key, &child, &config), $"ncclCommSplit ({name})", _comm);
        _session.WaitReady(_comm, $"ncclCommSplit ({name}) on {Describe()}", watch);
        if (color < 0 || child == IntPtr.Zero) return null;
        _session.WaitReady(child, $"ncclCommSplit ({name})", watch);
        return _session.Register(new NcclCommunicator(_session, child, name, members, key));
    }

    protected override void AllReduceCore(Tensor tensor, ReduceOp op, long sequence) =>
        Issue("all_reduce", sequence, tensor, stream =>
            Native.AllReduce(Pointer(tensor), Pointer(tensor), (nuint)tensor.NumberOfElements, DataType(tensor), RedOp(op), _comm, stream));

    protected override void ReduceScatterCore(Tensor input, Tensor output, ReduceOp op, long sequence) =>
        Issue("reduce_scatter", sequence, input, stream =>
            Native.ReduceScatter(Pointer(input), Pointer(output), (nuint)output.NumberOfElements, DataType(input), RedOp(op), _comm, stream));

    // The asynchronous reductions (gradient buckets, Training.OverlapGradReduce) go on the session's gradient stream.
    // Their tensors are views of the gradient buffers' persistent main gradients, never freed during a step, so nothing
    // needs recording with the caching allocator (PyTorch's recordStream): a later kernel on libtorch's stream cannot be
    // handed their memory while the reduction still reads or writes it. A caller passing a temporary tensor must keep
    // it alive until the handle has been waited for and libtorch's stream has passed that point.
    protected override CollectiveHandle AllReduceAsyncCore(Tensor tensor, ReduceOp op, long sequence) =>
        Issue("all_reduce", sequence, tensor, stream =>
            Native.AllReduce(Pointer(tensor), Pointer(tensor), (nuint)tensor.NumberOfElements, DataType(tensor), RedOp(op), _comm, stream), gradients: true);

    protected override CollectiveHandle ReduceScatterAsyncCore(Tensor input, Tensor output, ReduceOp op, long sequence) =>
        Issue("reduce_scatter", sequence, input, stream =>
            Native.ReduceScatter(Pointer(input), Pointer(output), (nuint)output.NumberOfElements, DataType(input), RedOp(op), _comm, stream), gradients: true);

    protected override void AllGatherCore(Tensor input, Tensor output, long sequence) =>
        Issue("all_gather", sequence, input, stream =>
            Native.AllGather(Pointer(input), Pointer(output), (nuint)input.NumberOfElements, DataType(input), _comm, stream));

    protected override void BroadcastCore(Tensor tensor, int root, long sequence) =>
        Issue("broadcast", sequence, tensor, stream =>
            Native.Broadcast(Pointer(tensor), Pointer(tensor), (nuint)tensor.NumberOfElements, DataType(tensor), root, _comm, stream));

    protected override void AllToAllCore(Tensor input, long[] sendRows, Tensor output, long[] recvRows, long sequence)
    {
        if (input.dtype != output.dtype) throw new ArgumentException($"{Describe()}: all_to_all needs one dtype, got {input.dtype} and {output.dtype}.");
        long rowElements = input.shape.Skip(1).Aggregate(1L, (a, b) => a * b);
        long element = input.ElementSize;
        IntPtr send = Pointer(input), recv = Pointer(output);
        Issue("all_to_all", sequence, input, stream =>
        {
            // NCCL's all-to-all-v: one grouped send and receive per peer with pairwise-matching counts.
            Native.Check(Native.GroupStart(), "ncclGroupStart");
            long sendOffset = 0, recvOffset = 0;
            var type = DataType(input);
            for (int p = 0; p < Size; p++)
            {
                if (sendRows[p] > 0)
                    Native.Check(Native.Send(send + (nint)(sendOffset * rowElements * element), (nuint)(sendRows[p] * rowElements), type, p, _comm, stream), "ncclSend", _comm);
                if (recvRows[p] > 0)
                    Native.Check(Native.Recv(recv + (nint)(recvOffset * rowElements * element), (nuint)(recvRows[p] * rowElements), type, p, _comm, stream), "ncclRecv", _comm);
                sendOffset += sendRows[p];
                recvOffset += recvRows[p];
            }
            return Native.GroupEnd();
        });
    }

    protected override void ExchangeCore(IReadOnlyList<PeerTransfer> transfers, long sequence) =>
        Issue("send_recv", sequence, transfers[0].Tensor, stream =>
        {
            Native.Check(Native.GroupStart(), "ncclGroupStart");
            foreach (var t in transfers)
            {
                var result = t.Send
                    ? Native.Send(Pointer(t.Tensor), (nuint)t.Tensor.NumberOfElements, DataType(t.Tensor), t.Peer, _comm, stream)
                    : Native.Recv(Pointer(t.Tensor), (nuint)t.Tensor.NumberOfElements, DataType(t.Tensor), t.Peer, _comm, stream);
                Native.Check(result, t.Send ? "ncclSend" : "ncclRecv", _comm);
            }
            return Native.GroupEnd();
        });

    protected override void BarrierCore(long sequence)
    {
        // NCCL has no barrier: a one-element all-reduce, waited for on the host.
        using var one = torch.ones(1, device: _session.Device);
        AllReduce(one);
        one.cpu().Dispose();
    }

    private readonly List<(IntPtr Start, IntPtr End)> _timed = new();

    /// <summary>
    /// Queues one NCCL call (or group) after a wait on libtorch's stream and hands it to the watchdog; timed on the
    /// stream. Synchronous operations run on the session's stream and libtorch's stream waits for them at once; with
    /// <paramref name="gradients"/> the call goes on the gradient stream and the returned handle's Wait joins it.
    /// </summary>
    private CollectiveHandle Issue(string op, long sequence, Tensor tensor, Func<IntPtr, NcclResult> call, bool gradients = false)
    {
        var record = Recent.LastOrDefault(r => r.Sequence == sequence) ?? new CollectiveRecord(sequence, op, $"{tensor.dtype}[{string.Join(", ", tensor.shape)}]", DateTime.UtcNow);
        var stream = gradients ? _session.GradientStream : _session.Stream;
        _session.BeforeOperation(stream);
        CudaDriver.Check(CudaDriver.cuEventCreate(out var start, 0), "cuEventCreate");
        CudaDriver.Check(CudaDriver.cuEventCreate(out var end, 0), "cuEventCreate");
        CudaDriver.Check(CudaDriver.cuEventRecord(start, stream), "cuEventRecord");
        var watch = Stopwatch.StartNew();
        Native.Check(call(stream), $"nccl {op} on {Describe()}", _comm);
        _session.WaitReady(_comm, $"nccl {op} on {Describe()}", watch);
        CudaDriver.Check(CudaDriver.cuEventRecord(end, stream), "cuEventRecord");
        lock (_timed) _timed.Add((start, end));
        return _session.AfterOperation(this, record, stream, join: !gradients);
    }

    /// <summary>Seconds the group's operations took on the NCCL stream since the last call (waits for them to finish).</summary>
    public override double TakeSeconds()
    {
        (IntPtr Start, IntPtr End)[] timed;
        lock (_timed)
        {
            timed = _timed.ToArray();
            _timed.Clear();
        }
        double seconds = 0;
        foreach (var (start, end) in timed)
        {
            CudaDriver.Check(CudaDriver.cuEventSynchronize(end), "cuEventSynchronize");
            CudaDriver.Check(CudaDriver.cuEventElapsedTime(out float ms, start, end), "cuEventElapsedTime");
            seconds += ms / 1000.0;
            CudaDriver.cuEventDestroy_v2(start);
            CudaDriver.cuEventDestroy_v2(end);
        }
        base.TakeSeconds();
        return seconds;
    }

    /// <summary>"global rank 3: all_to_all #12 (BFloat16[4096, 4096]) in group ep [2, 3] waited 600.0 s".</summary>
    internal string Report(CollectiveRecord record, TimeSpan waited) =>
        $"global rank {GlobalRank}: {record.Operation} #{record.Sequence} ({record.Shape}) in group {Describe()} waited {waited.TotalSeconds:0.0} s";

    private static IntPtr Pointer(Tensor t) => CudaKernels.DataPointer(t);

    private static NcclDataType DataType(Tensor t) => t.dtype switch
    {
        ScalarType.Float32 => NcclDataType.Float32,
        ScalarType.BFloat16 => NcclDataType.Bfloat16,
        ScalarType.Float16 => NcclDataType.Float16,
        ScalarType.Float64 => NcclDataType.Float64,
        ScalarType.Int64 => NcclDataType.Int64,
        ScalarType.Int32 => NcclDataType.Int32,
        ScalarType.Byte or ScalarType.Bool => NcclDataType.Uint8,
        ScalarType.Int8 => NcclDataType.Int8,
        _ => throw new ArgumentException($"NCCL has no data type for {t.dtype}."),
    };

    private static NcclRedOp RedOp(ReduceOp op) => op switch
    {
        ReduceOp.Sum => NcclRedOp.Sum,
        ReduceOp.Avg => NcclRedOp.Avg,
        ReduceOp.Max => NcclRedOp.Max,
        ReduceOp.Min => NcclRedOp.Min,
        _ => throw new ArgumentOutOfRangeException(nameof(op)),
    };

    /// <summary>ncclCommAbort: interrupts whatever the communicator is running (the watchdog's path).</summary>
    internal void AbortNow()
    {
        var comm = Interlocked.Exchange(ref _comm, IntPtr.Zero);
        if (comm != IntPtr.Zero) Native.CommAbort(comm);
    }

    public override void Dispose()
    {
        var comm = Interlocked.Exchange(ref _comm, IntPtr.Zero);
        if (comm != IntPtr.Zero)
        {
            var watch = Stopwatch.StartNew();
            try
            {
                Native.Check(Native.CommFinalize(comm), "ncclCommFinalize", comm);
                _session.WaitReady(comm, $"ncclCommFinalize ({Describe()})", watch);
                Native.CommDestroy(comm);
            }
            catch (Exception)
            {
                Native.CommAbort(comm);
                throw;
            }
            finally
            {
                _session.Unregister(this);
            }
        }
        base.Dispose();
    }
}
