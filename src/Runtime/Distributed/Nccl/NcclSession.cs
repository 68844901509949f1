using System.Diagnostics;
using Moe.Runtime.Devices;
using static TorchSharp.torch;

namespace Moe.Runtime.Distributed.Nccl;

/// <summary>
/// One process's NCCL state: the library, the communication stream, the communicators, and the watchdog that
/// turns a collective stuck past its deadline into a report and an abort instead of a hang (what PyTorch's
/// ProcessGroupNCCL watchdog does).
/// </summary>
/// <remarks>
/// <para>
/// Ordering: libtorch queues everything on the legacy default stream. NCCL runs on its own non-blocking stream;
/// before each operation that stream waits on an event recorded on the default stream (the inputs are ready),
/// and after it the default stream waits on the operation's event (the outputs are ready, and no later kernel
/// can reuse the memory of a tensor the collective still reads: the caching allocator is ordered by the default
/// stream). The host never blocks for a collective.
/// </para>
/// <para>
/// Gradient reduction (Training.OverlapGradReduce) runs on a second NCCL stream, <see cref="GradientStream"/>, created
/// and destroyed with the session: the reductions started during the backward are ordered after the work already
/// queued on libtorch's stream by the same kind of event, but libtorch's stream does not wait for them until the
/// handle's Wait (<see cref="CollectiveHandle"/>), so the backward of the lower layers — and their expert all-to-all
/// on <see cref="Stream"/>, which must not queue behind a 40M-element reduce-scatter — runs meanwhile. Every
/// reduction of the gradient buffers goes on this stream once overlap is on, so one communicator's gradient work is
/// never split over two streams.
/// </para>
/// <para>
/// Deadlines: every operation's completion event is watched by a thread that polls it and each communicator's
/// asynchronous error. When one passes its deadline or NCCL reports an error, the watchdog prints the report
/// (group, ranks, operation, sequence number, time waited), raises the job's abort flag through
/// <see cref="OnAbort"/> so the other ranks stop promptly, aborts every communicator, and ends the process
/// with exit code 3. Communicators are non-blocking (config.blocking = 0), so ncclCommAbort can interrupt them.
/// </para>
/// </remarks>
public sealed unsafe class NcclSession : IDisposable
{
    private readonly List<NcclCommunicator> _comms = new();
    private readonly List<Pending> _pending = new();
    private readonly Stack<IntPtr> _events = new();
    private readonly Thread _watchdog;
    private readonly IntPtr _context;
    private volatile bool _stopping;

    private NcclSession(TimeSpan timeout, Device device, TextWriter log, Action<string>? onAbort)
    {
        Native = NcclNative.Load();
        Timeout = timeout;
        Device = device;
        Log = log;
        OnAbort = onAbort;
        _context = CudaDriver.CurrentContext();
        CudaDriver.Check(CudaDriver.cuStreamCreate(out var stream, 1 /* CU_STREAM_NON_BLOCKING */), "cuStreamCreate");
        Stream = stream;
        CudaDriver.Check(CudaDriver.cuStreamCreate(out var gradients, 1 /* CU_STREAM_NON_BLOCKING */), "cuStreamCreate");
        GradientStream = gradients;
        _watchdog = new Thread(Watch) { IsBackground = true, Name = "nccl watchdog" };
        _watchdog.Start();
    }

    /// <summary>
    /// Starts NCCL on this process's GPU (libtorch must have used it already, so its context is current).
    /// <paramref name="onAbort"/> is told the reason when the watchdog aborts the job.
    /// </summary>
    public static NcclSession Start(TimeSpan timeout, Device device, TextWriter log, Action<string>? onAbort = null)
    {
        using (zeros(1, device: device)) { }   // makes the device's primary context current on this thread
        return new NcclSession(timeout, device, log, onAbort);
    }

    internal NcclNative Native { get; }

    /// <summary>The stream NCCL runs on.</summary>
    internal IntPtr Stream { get; }

    /// <summary>The stream asynchronous gradient reductions run on (<see cref="Communicator.ReduceScatterAsync"/>).</summary>
    internal IntPtr GradientStream { get; }

    public TimeSpan Timeout { get; }
    public Device Device { get; }
    public TextWriter Log { get; }
    public Action<string>? OnAbort { get; }

    /// <summary>"NCCL 2.28.9 (/path/libnccl.so.2)".</summary>
    public string Describe() => $"NCCL {Native.VersionText} ({Native.Path})";

    /// <summary>A new unique id (rank 0 makes it, the bootstrap sends it to every rank; never print it).</summary>
    public unsafe byte[] NewUniqueId()
    {
        NcclUniqueIdBytes id;
        Native.Check(Native.GetUniqueId(&id), "ncclGetUniqueId");
        var bytes = new byte[128];
        for (int i = 0; i < 128; i++) bytes[i] = id.Internal[i];
        return bytes;
    }

    /// <summary>The world communicator: collective over all <paramref name="size"/> ranks, each passing the same <paramref name="uniqueId"/>.</summary>
    public unsafe Communicator World(byte[] uniqueId, int rank, int size)
    {
        if (uniqueId.Length != 128) throw new ArgumentException("An NCCL unique id has 128 bytes.");
        NcclUniqueIdBytes id;
        for (int i = 0; i < 128; i++) id.Internal[i] = uniqueId[i];
        var config = NcclConfig.Create();
        IntPtr comm;
        var watch = Stopwatch.StartNew();
        Native.Check(Native.CommInitRankConfig(&comm, size, id, rank, &config), "ncclCommInitRankConfig");
        WaitReady(comm, "ncclCommInitRankConfig (world)", watch);
        return Register(new NcclCommunicator(this, comm, "world", Enumerable.Range(0, size).ToArray(), rank));
    }

    internal NcclCommunicator Register(NcclCommunicator c)
    {
        lock (_comms) _comms.Add(c);
        return c;
    }

    internal void Unregister(NcclCommunicator c)
    {
        lock (_comms) _comms.Remove(c);
    }

    /// <summary>Waits (host-side) until a non-blocking communicator has finished its last call, within the deadline.</summary>
    internal unsafe void WaitReady(IntPtr comm, string call, Stopwatch watch)
    {
        while (true)
        {
            NcclResult state;
            Native.Check(Native.CommGetAsyncError(comm, &state), "ncclCommGetAsyncError", comm);
            if (state == NcclResult.Success) return;
            if (state != NcclResult.InProgress) throw new NcclException(state, $"{call} failed: {Native.Describe(state, comm)}");
            if (watch.Elapsed > Timeout)
                throw new CollectiveTimeoutException($"{call} did not finish within {Timeout.TotalSeconds:0} s (every rank must reach it; is one missing?).");
            Thread.Yield();
        }
    }

    /// <summary>Makes <paramref name="stream"/> (an NCCL stream) wait for the work queued so far on libtorch's stream.</summary>
    internal void BeforeOperation(IntPtr stream)
    {
        var ready = TakeEvent();
        CudaDriver.Check(CudaDriver.cuEventRecord(ready, CudaDriver.DefaultStream), "cuEventRecord");
        CudaDriver.Check(CudaDriver.cuStreamWaitEvent(stream, ready, 0), "cuStreamWaitEvent");
        // A wait captures the event's current record, so the event can be recorded again at once.
        lock (_events) _events.Push(ready);
    }

    /// <summary>
    /// Has the watchdog watch the operation just queued on <paramref name="stream"/>, and makes libtorch's stream wait
    /// for it now (<paramref name="join"/>), or returns a handle whose Wait does (the asynchronous operations).
    /// </summary>
    internal CollectiveHandle AfterOperation(NcclCommunicator comm, CollectiveRecord record, IntPtr stream, bool join)
    {
        var done = TakeEvent();
        CudaDriver.Check(CudaDriver.cuEventRecord(done, stream), "cuEventRecord");
        CollectiveHandle handle = CollectiveHandle.Completed;
        if (join) CudaDriver.Check(CudaDriver.cuStreamWaitEvent(CudaDriver.DefaultStream, done, 0), "cuStreamWaitEvent");
        else
        {
            // The handle's own event: the watchdog recycles `done` once it completes, and a recycled event may be
            // recorded again by a later operation before the handle is waited for.
            var joinable = TakeEvent();
            CudaDriver.Check(CudaDriver.cuEventRecord(joinable, stream), "cuEventRecord");
            handle = new StreamHandle(this, joinable);
        }
        lock (_pending) _pending.Add(new Pending(done, comm, record, Stopwatch.StartNew()));
        return handle;
    }

    /// <summary>Wait: libtorch's stream waits on the operation's event (captured at once, so the event goes back to the pool).</summary>
    private sealed class StreamHandle(NcclSession session, IntPtr evt) : CollectiveHandle
    {
        private IntPtr _event = evt;

        public override void Wait()
        {
            var e = Interlocked.Exchange(ref _event, IntPtr.Zero);
            if (e == IntPtr.Zero) return;
            CudaDriver.Check(CudaDriver.cuStreamWaitEvent(CudaDriver.DefaultStream, e, 0), "cuStreamWaitEvent");
            lock (session._events) session._events.Push(e);
        }
    }

    private IntPtr TakeEvent()
    {
        lock (_events)
        {
            if (_events.Count > 0) return _events.Pop();
        }
        CudaDriver.Check(CudaDriver.cuEventCreate(out var evt, 2 /* CU_EVENT_DISABLE_TIMING */), "cuEventCreate");
        return evt;
    }

    private void Watch()
    {
        CudaDriver.cuCtxSetCurrent(_context);
        while (!_stopping)
        {
            Thread.Sleep(50);
            string? failure = null;
            lock (_pending)
            {
                for (int i = _pending.Count - 1; i >= 0; i--)
                {
                    var p = _pending[i];
                    int status = CudaDriver.cuEventQuery(p.Done);
                    if (status == 0)
                    {
                        _pending.RemoveAt(i);
                        lock (_events) _events.Push(p.Done);
                        continue;
                    }
                    if (status != CudaDriver.NotReady)
                        failure ??= $"{p.Comm.Report(p.Record, p.Watch.Elapsed)}: the CUDA stream reported error {status}";
                    else if (p.Watch.Elapsed > Timeout)
                        failure ??= $"{p.Comm.Report(p.Record, p.Watch.Elapsed)}; the deadline ({Timeout.TotalSeconds:0.###} s) passed";
                }
            }
            failure ??= AsyncError();
            if (failure is not null) Abort(failure);
        }
    }

    private unsafe string? AsyncError()
    {
        NcclCommunicator[] comms;
        lock (_comms) comms = _comms.ToArray();
        foreach (var c in comms)
        {
            NcclResult state;
            if (Native.CommGetAsyncError(c.Handle, &state) == NcclResult.Success && state is not (NcclResult.Success or NcclResult.InProgress))
                return $"{c.Describe()} reported an asynchronous NCCL error: {Native.Describe(state, c.Handle)}";
        }
        return null;
    }

    /// <summary>Reports, raises the job's abort flag, aborts every communicator and ends the process (exit code 3).</summary>
    public void Abort(string reason)
    {
        Log.WriteLine($"error: {reason}. Aborting the NCCL communicators; this rank exits with code 3.");
        Log.Flush();
        try { OnAbort?.Invoke(reason); } catch (Exception e) { Log.WriteLine($"note: could not raise the job's abort flag: {e.Message}"); }
        NcclCommunicator[] comms;
        lock (_comms) comms = _comms.ToArray();
        foreach (var c in comms) c.AbortNow();
        Log.Flush();
        Environment.Exit(3);
    }

    public void Dispose()
    {
        _stopping = true;
        _watchdog.Join(TimeSpan.FromSeconds(2));
        NcclCommunicator[] comms;
        lock (_comms) comms = _comms.ToArray();
        foreach (var c in comms) c.Dispose();
        CudaDriver.cuStreamSynchronize(Stream);
        CudaDriver.cuStreamSynchronize(GradientStream);
        lock (_pending)
        {
            foreach (var p in _pending) CudaDriver.cuEventDestroy_v2(p.Done);
        }
        lock (_events) foreach (var e in _events) CudaDriver.cuEventDestroy_v2(e);
        CudaDriver.cuStreamDestroy_v2(Stream);
        CudaDriver.cuStreamDestroy_v2(GradientStream);
    }

    private sealed record Pending(IntPtr Done, NcclCommunicator Comm, CollectiveRecord Record, Stopwatch Watch);
}
