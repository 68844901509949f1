using Moe.Runtime.Distributed;
using Moe.Runtime.MixtureOfExperts;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.Training;

// Shapes: N elements of a buffer (parameters laid end to end, buckets padded), D members of the reducing group.

/// <summary>A parameter of a <see cref="GradientBuffer"/>: its name, and where its gradient lives in the flat buffer.</summary>
/// <param name="Name">The parameter's name in the model (hub-independent: checkpoints map it).</param>
/// <param name="Parameter">The parameter.</param>
/// <param name="Offset">First element in the buffer.</param>
/// <param name="Decays">Whether AdamW's weight decay applies (Megatron: matrices yes, 1-D parameters no).</param>
/// <param name="CountedInNorm">Whether this rank counts the parameter in the global gradient norm (false for copies that another rank counts, e.g. tensor-parallel duplicates).</param>
public sealed record BufferEntry(string Name, Parameter Parameter, long Offset, bool Decays, bool CountedInNorm)
{
    /// <summary>Elements of the parameter.</summary>
    public long Numel => Parameter.NumberOfElements;

    /// <summary>
    /// Runs (first element in the parameter, length) that another rank counts in the gradient norm although this rank
    /// counts the rest (replicated key-value rows of a q/k/v weight); empty for most parameters.
    /// </summary>
    public IReadOnlyList<(long Start, long Length)> Uncounted { get; init; } = [];
}

/// <summary>A contiguous run of a buffer reduced by one collective: [Start, Start + Length), Length a multiple of the group size.</summary>
public sealed record GradientBucket(int Index, long Start, long Length, int FirstEntry, int EntryCount);

/// <summary>
/// Megatron-Core's ParamAndGradBuffer for one reduction domain (distributed/param_and_grad_buffer.py): the
/// gradients of a set of parameters — the dense ones, reduced over data parallel × context parallel, or the
/// expert ones, reduced over expert data parallel — laid end to end in backward order and cut into buckets,
/// each reduced by one collective.
/// </summary>
/// <remarks>
/// <para>
/// Each parameter's <c>.grad</c> is bound to a view of the buffer, so autograd and the experts' own backward
/// accumulate into it in place and a bucket is one contiguous tensor for NCCL. With bf16 parameters the views
/// are bf16 (autograd requires the parameter's dtype) and each micro-batch's gradients are added into an fp32
/// main-gradient buffer (Megatron's <c>main_grad</c>, accumulate_allreduce_grads_in_fp32, which Megatron forces
/// on with bf16), so accumulation over micro-batches and the reduction happen in fp32. With fp32 parameters
/// the views are the main gradients themselves.
/// </para>
/// <para>
/// Buckets hold whole parameters and close once they reach the bucket size (Megatron: max(40M, 1M·D)
/// elements); each is padded to a multiple of D so that a reduce-scatter gives every member an equal,
/// contiguous shard — the slice the distributed optimizer owns. Gradients are pre-scaled by
/// <see cref="GradientScale"/> (Megatron's gradient_scaling_factor, 1/DP by default) and summed.
/// </para>
/// <para>
/// Overlap (<c>overlap</c>, Training.OverlapGradReduce, Megatron's --overlap-grad-reduce): in the step's last
/// micro-batch (<see cref="BeginLastMicroBatch"/>) a bucket is ready once every one of its parameters' sinks has
/// received its gradient (<see cref="GradientSink.Arrived"/>: the experts' backward accumulates there — TorchSharp has
/// no autograd hooks, and Megatron's grad hook fires at the same point); it is then scaled and its reduction started
/// asynchronously (<see cref="Communicator.ReduceScatterAsync"/>) while the backward goes on. Buckets start strictly in
/// bucket order — backward order, the same on every rank — so the group's operations pair up; a bucket that is not
/// ready (a parameter whose gradient comes through autograd, a layer whose backward did not run) holds back the later
/// ones until <see cref="Reduce"/>, which starts the rest after the backward and waits for all. Only direct buffers
/// have sinks, so an overlapping buffer is made direct even in fp32 (the sums are the same: the first micro-batch's
/// gradient is copied where 0 + g was added).
/// </para>
/// </remarks>
public sealed class GradientBuffer : IDisposable
{
    private readonly List<BufferEntry> _entries = new();
    private readonly List<GradientBucket> _buckets = new();
    private bool _firstMicroBatch = true;
    private bool _modelGradDirty;
    private readonly Dictionary<Parameter, GradientSink> _sinks = new(ReferenceEqualityComparer.Instance);
    // Overlap: the bucket of each sink, the sinks that arrived in the last micro-batch per bucket, the handles of the
    // buckets started this step (null: not started), the next bucket to start, and whether the window is open.
    private readonly Dictionary<GradientSink, int> _bucketOf = new(ReferenceEqualityComparer.Instance);
    private readonly HashSet<GradientSink> _arrived = new(ReferenceEqualityComparer.Instance);
    private int[] _arrivedPerBucket = [];
    private CollectiveHandle?[] _handles = [];
    private int _nextToStart;
    private bool _armed;
    private bool _armedSharded;
    private int _armedWindows;

    /// <param name="name">"dense" or "expert", for reports.</param>
    /// <param name="parameters">The parameters in backward order (the reverse of the forward's use), with their decay and norm flags.</param>
    /// <param name="group">The group that reduces these gradients.</param>
    /// <param name="bucketElements">Bucket size in elements.</param>
    /// <param name="gradientScale">Factor applied to the gradients before they are summed over the group.</param>
    /// <param name="direct">
    /// With parameters in a lower precision than fp32: their gradients go straight into the fp32 main gradients
    /// through <see cref="SinkOf"/> (the experts' own backward does this) instead of through bf16 views, which are
    /// then not allocated. A gradient autograd still produces (a fallback path) is moved into the main gradient
    /// when the micro-batch is accumulated.
    /// </param>
    /// <param name="overlap">
    /// Start each bucket's reduction during the last micro-batch's backward, as soon as its gradients are in (Megatron's
    /// --overlap-grad-reduce); with <paramref name="direct"/>, also for fp32 parameters (the readiness signal is the sink).
    /// Without sinks every bucket is reduced after the backward, on the same asynchronous path.
    /// </param>
    public GradientBuffer(string name, IReadOnlyList<(string Name, Parameter Parameter, bool Decays, bool CountedInNorm)> parameters,
        Communicator group, long bucketElements, double gradientScale, bool direct = false, bool overlap = false)
    {
        if (parameters.Count == 0) throw new ArgumentException($"The {name} gradient buffer has no parameters.");
        var dtype = parameters[0].Parameter.dtype;
        var device = parameters[0].Parameter.device;
        if (parameters.Any(p => p.Parameter.dtype != dtype))
            throw new ArgumentException($"The {name} gradient buffer mixes dtypes; Megatron keeps one buffer per (param dtype, grad dtype).");
        Name = name;
        Group = group;
        GradientScale = gradientScale;
        ParameterDtype = dtype;
        long offset = 0, bucketStart = 0;
        int first = 0;
        for (int i = 0; i < parameters.Count; i++)
        {
            var (n, p, decays, counted) = parameters[i];
            _entries.Add(new BufferEntry(n, p, offset, decays, counted));
            offset += p.NumberOfElements;
            if (offset - bucketStart >= bucketElements || i == parameters.Count - 1)
            {
                long length = RoundUp(offset - bucketStart, group.Size);
                _buckets.Add(new GradientBucket(_buckets.Count, bucketStart, length, first, i + 1 - first));
                offset = bucketStart + length;
                bucketStart = offset;
                first = i + 1;
            }
        }
        Length = offset;
        MainGrad = torch.zeros(Length, dtype: ScalarType.Float32, device: device);
        OverlapGradReduce = overlap;
        bool sinks = direct && (dtype != ScalarType.Float32 || overlap);
        ModelGrad = dtype == ScalarType.Float32 || sinks ? null : torch.zeros(Length, dtype: dtype, device: device);
        if (sinks)
            foreach (var e in _entries) _sinks[e.Parameter] = new GradientSink(MainGrad.narrow(0, e.Offset, e.Numel).view(e.Parameter.shape));
        if (overlap)
        {
            foreach (var b in _buckets)
                foreach (var e in EntriesOf(b))
                    if (_sinks.TryGetValue(e.Parameter, out var sink))
                    {
                        _bucketOf[sink] = b.Index;
                        sink.Arrived = Arrived;
                    }
            _arrivedPerBucket = new int[_buckets.Count];
            _handles = new CollectiveHandle?[_buckets.Count];
        }
        BindGradients();
    }

    /// <summary>"dense" or "expert".</summary>
    public string Name { get; }

    /// <summary>Whether buckets are reduced asynchronously, started during the last backward when ready (Training.OverlapGradReduce).</summary>
    public bool OverlapGradReduce { get; }

    /// <summary>
    /// Told when a bucket's reduction starts: true while the last micro-batch's backward is still running (the
    /// overlap), false for the buckets <see cref="Reduce"/> starts after it. For tests and traces.
    /// </summary>
    public event Action<GradientBucket, bool>? BucketStarted;

    /// <summary>The group that reduces these gradients (dp_cp for dense, expert_dp for experts).</summary>
    public Communicator Group { get; }

    /// <summary>Gradients are multiplied by this before the sum over <see cref="Group"/>.</summary>
    public double GradientScale { get; }

    /// <summary>The parameters' dtype.</summary>
    public ScalarType ParameterDtype { get; }

    /// <summary>Elements, padding included.</summary>
    public long Length { get; }

    /// <summary>fp32 gradients [N], accumulated over the step's micro-batches and reduced in place.</summary>
    public Tensor MainGrad { get; }

    /// <summary>The parameters' own gradients [N] in their dtype, when that is not fp32; null otherwise.</summary>
    public Tensor? ModelGrad { get; }

    public IReadOnlyList<BufferEntry> Entries => _entries;

    /// <summary>
    /// Leaves runs of <paramref name="parameter"/>'s elements out of this rank's share of the gradient norm (another
    /// tensor rank holds and counts the same elements: replicated key-value heads). Call before the optimizer is built.
    /// </summary>
    public void Uncount(Parameter parameter, IReadOnlyList<(long Start, long Length)> runs)
    {
        int i = _entries.FindIndex(e => ReferenceEquals(e.Parameter, parameter));
        if (i < 0) throw new ArgumentException($"The {Name} gradient buffer does not hold this parameter.", nameof(parameter));
        _entries[i] = _entries[i] with { Uncounted = [.. _entries[i].Uncounted, .. runs] };
    }

    public IReadOnlyList<GradientBucket> Buckets => _buckets;

    /// <summary>Whether gradients reach the main gradients through sinks (<c>direct</c> with low-precision parameters).</summary>
    public bool Direct => _sinks.Count > 0;

    /// <summary>The fp32 main gradient of <paramref name="parameter"/> as a sink (direct buffers only).</summary>
    public GradientSink SinkOf(Parameter parameter) => _sinks.TryGetValue(parameter, out var sink) ? sink
        : throw new InvalidOperationException($"The {Name} gradient buffer has no sink for that parameter (it is not a direct buffer, or the parameter is not in it).");

    /// <summary>This member's shard of a bucket: the elements the distributed optimizer updates here.</summary>
    public (long Start, long Length) Shard(GradientBucket bucket)
    {
        long length = bucket.Length / Group.Size;
        return (bucket.Start + Group.Rank * length, length);
    }

    /// <summary>The entries of a bucket.</summary>
    public IEnumerable<BufferEntry> EntriesOf(GradientBucket bucket) => _entries.Skip(bucket.FirstEntry).Take(bucket.EntryCount);

    /// <summary>
    /// Readies the buffers for a new step and (re)binds every parameter's gradient to its view. Only what will be
    /// accumulated into is zeroed: with bf16 parameters the first micro-batch copies into the main gradients, and
    /// the bf16 gradients were zeroed when they were last accumulated (each pass over billions of elements costs
    /// milliseconds of memory bandwidth).
    /// </summary>
    public void BindGradients()
    {
        using var _ = torch.no_grad();
        _firstMicroBatch = true;
        if (_handles.Any(h => h is not null))
            throw new InvalidOperationException($"The {Name} gradient buffer still has bucket reductions in flight: Reduce must end a step before the next binds the gradients.");
        _armed = false;
        _armedWindows = 0;
        _nextToStart = 0;
        _arrived.Clear();
        Array.Clear(_arrivedPerBucket);
        if (Direct)
        {
            foreach (var e in _entries) e.Parameter.grad = null;
            foreach (var sink in _sinks.Values) sink.Fresh = true;
            return;
        }
        if (ModelGrad is null) MainGrad.zero_();
        else if (_modelGradDirty) ModelGrad.zero_();
        _modelGradDirty = ModelGrad is not null;   // a backward is about to write into it
        var grads = ModelGrad ?? MainGrad;
        foreach (var e in _entries)
            e.Parameter.grad = grads.narrow(0, e.Offset, e.Numel).view(e.Parameter.shape);
    }

    /// <summary>
    /// After each micro-batch's backward: with bf16 parameters, adds the micro-batch's gradients into the fp32
    /// main gradients and clears them (the first micro-batch copies, so the main buffer needs no zeroing pass).
    /// </summary>
    public void AccumulateMicroBatch()
    {
        _armed = false;   // the last backward is over: what is not started yet, Reduce starts
        if (Direct)
        {
            // Gradients autograd produced itself (the per-expert loop) go into the main gradients too.
            foreach (var e in _entries)
            {
                using var g = e.Parameter.grad;
                if (g is null) continue;
                _sinks[e.Parameter].Accumulate(g);
                e.Parameter.grad = null;
            }
            return;
        }
        if (ModelGrad is null) return;
        using var _ = torch.no_grad();
        if (_firstMicroBatch) MainGrad.copy_(ModelGrad);
        else MainGrad.add_(ModelGrad);
        ModelGrad.zero_();
        _modelGradDirty = false;
        _firstMicroBatch = false;
    }

    /// <summary>
    /// Reduces every bucket over <see cref="Group"/> after the last micro-batch: scaled by
    /// <see cref="GradientScale"/>, then reduce-scattered (each member keeps the sum of its shard; the
    /// distributed optimizer) or all-reduced (every member keeps the whole sum).
    /// </summary>
    public void Reduce(bool sharded)
    {
        using var _ = torch.no_grad();
        _armed = false;
        foreach (var sink in _sinks.Values)
            if (sink.Fresh) sink.MainGradient.zero_();   // no gradient arrived this step: it is zero, not last step's
        if (!OverlapGradReduce)
        {
            foreach (var b in _buckets) ReduceBucket(b, sharded);
            return;
        }
        if (_armedWindows > 0 && _armedSharded != sharded)
            throw new InvalidOperationException($"The {Name} gradient buffer started reductions as {(_armedSharded ? "reduce-scatters" : "all-reduces")} but Reduce asks for {(sharded ? "reduce-scatters" : "all-reduces")}.");
        while (_nextToStart < _buckets.Count) Start(_buckets[_nextToStart++], sharded, duringBackward: false);
        // Before the optimizer reads the gradients: libtorch's stream waits for every reduction (the host does not).
        // Waiting here, not later, also keeps later operations of the same group (the step's metric sums on dp_cp)
        // from running beside these on another stream.
        for (int i = 0; i < _handles.Length; i++)
        {
            _handles[i]?.Wait();
            _handles[i] = null;
        }
    }

    /// <summary>
    /// Opens a readiness window (call just before a backward; overlap only): until <see cref="AccumulateMicroBatch"/>,
    /// a gradient arriving in a sink is that parameter's last of the step, and a bucket whose every sink has had its
    /// last gradient is scaled and its reduction started, in bucket order. The window is the step's last backward; under
    /// a virtual pipeline each model chunk's last backward (only that chunk's layers get gradients in it), arrivals adding
    /// up over the step's windows. <paramref name="sharded"/> must be what <see cref="Reduce"/> will be given.
    /// </summary>
    public void BeginLastMicroBatch(bool sharded)
    {
        if (!OverlapGradReduce) return;
        if (_armedWindows > 0 && _armedSharded != sharded)
            throw new InvalidOperationException($"The {Name} gradient buffer's readiness windows of one step disagree on sharding.");
        _armed = true;
        _armedWindows++;
        _armedSharded = sharded;
    }

    /// <summary>A sink received a gradient: in the last micro-batch, start the buckets that are now ready, in order.</summary>
    private void Arrived(GradientSink sink)
    {
        int b = _bucketOf[sink];
        if (_handles[b] is not null)
            throw new InvalidOperationException($"A gradient arrived in bucket {b} of the {Name} gradient buffer after its reduction had started " +
                "(a parameter's gradient came twice in the last micro-batch); the reduced gradients would be wrong.");
        if (!_armed || !_arrived.Add(sink)) return;
        _arrivedPerBucket[b]++;
        using var _ = torch.no_grad();
        while (_nextToStart < _buckets.Count && _arrivedPerBucket[_nextToStart] == _buckets[_nextToStart].EntryCount)
            Start(_buckets[_nextToStart++], _armedSharded, duringBackward: true);
    }

    /// <summary>Scales a bucket and starts its reduction (a view of the persistent main gradients: see the NCCL backend's note).</summary>
    private void Start(GradientBucket b, bool sharded, bool duringBackward)
    {
        _handles[b.Index] = ReduceBucket(b, sharded, asynchronously: true);
        BucketStarted?.Invoke(b, duringBackward);
    }

    /// <summary>
    /// Scales a bucket and sums it over the group: whole on every member, or each member's shard (<paramref name="sharded"/>).
    /// Synchronous (the handle is complete), or <paramref name="asynchronously"/> on the backend's gradient stream.
    /// </summary>
    private CollectiveHandle ReduceBucket(GradientBucket b, bool sharded, bool asynchronously = false)
    {
        using var view = MainGrad.narrow(0, b.Start, b.Length);
        if (GradientScale != 1.0) view.mul_(GradientScale);
        if (Group.Size == 1) return CollectiveHandle.Completed;   // the sum over one member is in place already
        if (!sharded)
        {
            if (asynchronously) return Group.AllReduceAsync(view);
            Group.AllReduce(view);
            return CollectiveHandle.Completed;
        }
        var (start, length) = Shard(b);
        using var shard = MainGrad.narrow(0, start, length);
        if (asynchronously) return Group.ReduceScatterAsync(view, shard);
        Group.ReduceScatter(view, shard);
        return CollectiveHandle.Completed;
    }

    private static long RoundUp(long value, long multiple) => (value + multiple - 1) / multiple * multiple;

    public void Dispose()
    {
        foreach (var e in _entries) e.Parameter.grad = null;
        MainGrad.Dispose();
        ModelGrad?.Dispose();
    }
}
