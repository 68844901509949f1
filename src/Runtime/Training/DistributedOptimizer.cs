using Moe.Runtime.Distributed;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Training;

// Shapes: n elements of this member's shard of a bucket.

/// <summary>A slice of one rank's optimizer state for one parameter (<see cref="DistributedOptimizer.StateSlices"/>).</summary>
/// <param name="Buffer">The gradient buffer holding the parameter.</param>
/// <param name="Entry">The parameter's entry in it.</param>
/// <param name="BlockStart">First element, in the parameter's local tensor flattened.</param>
/// <param name="Length">Elements.</param>
/// <param name="Main">fp32 main parameters [Length] (a view).</param>
/// <param name="ExpAvg">Adam's first moment [Length] (a view).</param>
/// <param name="ExpAvgSq">Adam's second moment [Length] (a view).</param>
public sealed record OptimizerStateSlice(GradientBuffer Buffer, BufferEntry Entry, long BlockStart, long Length, Tensor Main, Tensor ExpAvg, Tensor ExpAvgSq);

/// <summary>Adam's hyper-parameters (Megatron --adam-beta1/2, --adam-eps, --weight-decay).</summary>
public sealed record AdamSettings(double Beta1, double Beta2, double Eps, double WeightDecay)
{
    public static AdamSettings From(Dsl.Training t) => new(t.AdamBeta1, t.AdamBeta2, t.AdamEps, t.WeightDecay);
}

/// <summary>
/// AdamW with decoupled weight decay over the shards of <see cref="GradientBuffer"/>s: Megatron-Core's
/// distributed optimizer (optimizer/distrib_optimizer.py). Each member of a buffer's reducing group owns a
/// contiguous shard of every bucket and keeps, for that shard only, the fp32 main parameters and Adam's two
/// moments; after its update it all-gathers the new parameters over the group, in the parameters' dtype.
/// Unsharded (Megatron without --use-distributed-optimizer, and the one-device run) every member owns
/// whole buckets and no gather is needed: the same code with a shard of the full length.
/// </summary>
/// <remarks>
/// <para>
/// The update is PyTorch's AdamW, which Megatron's fused Adam computes in adam_w mode: p ← p·(1 − lr·wd·decay);
/// m ← β1·m + (1 − β1)·g; v ← β2·v + (1 − β2)·g²; p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε), with
/// decay 0 on 1-D parameters (norm weights) as Megatron's get_param_groups exempts them.
/// </para>
/// <para>
/// The gradient norm is global: every rank adds the squares of the gradient elements it counts — its shard
/// (sharded) or, unsharded, the whole buffer on the group's first member only — and the sums are all-reduced
/// over the world, so each element of the model counts exactly once.
/// </para>
/// </remarks>
public sealed class DistributedOptimizer : IDisposable
{
    private readonly List<ShardState> _shards = new();
    private readonly Communicator _world;
    private readonly AdamSettings _adam;
    private int _step;
    private readonly long _chunkElements;

    /// <param name="buffers">The gradient buffers whose shards this rank updates.</param>
    /// <param name="world">All ranks (the gradient norm is summed over them).</param>
    /// <param name="adam">Adam's hyper-parameters.</param>
    /// <param name="sharded">Megatron's distributed optimizer (state sharded over each buffer's group), or whole buckets on every member.</param>
    /// <param name="chunkElements">Elements per operation of the element-wise loops: the bound on their temporaries (tests make it small).</param>
    public DistributedOptimizer(IReadOnlyList<GradientBuffer> buffers, Communicator world, AdamSettings adam, bool sharded, long chunkElements = 1L << 28)
    {
        if (chunkElements < 1) throw new ArgumentOutOfRangeException(nameof(chunkElements), chunkElements, "At least one element per chunk.");
        _chunkElements = chunkElements;
        _world = world;
        _adam = adam;
        Sharded = sharded;
        Buffers = buffers;
        using var _ = torch.no_grad();
        foreach (var buffer in buffers)
            foreach (var bucket in buffer.Buckets)
            {
                var (start, length) = sharded ? buffer.Shard(bucket) : (bucket.Start, bucket.Length);
                var state = new ShardState(buffer, bucket, start, length, MainParameters(buffer, start, length),
                    Runs(buffer, start, length, e => e.Decays ? [(0, e.Numel)] : []),
                    Runs(buffer, start, length, CountedRuns),
                    countsInNorm: sharded || buffer.Group.Rank == 0);
                _shards.Add(state);
            }
    }

    /// <summary>Whether state is sharded over each buffer's group.</summary>
    public bool Sharded { get; }

    public IReadOnlyList<GradientBuffer> Buffers { get; }

    /// <summary>Optimizer steps taken (Adam's t).</summary>
    public int Steps => _step;

    // ---- Checkpoint state (issue 14) ----

    /// <summary>
    /// This rank's optimizer state, one slice per (shard, parameter) pair that overlap: the fp32 main parameters and
    /// Adam's moments of elements [<see cref="OptimizerStateSlice.BlockStart"/>, + Length) of the parameter's local
    /// tensor (flattened). The tensors are views of the shard state — reading them saves it, copying into them
    /// restores it; dispose them (a dispose scope) when done. Padding is not listed: it holds zeros that never change.
    /// </summary>
    public IEnumerable<OptimizerStateSlice> StateSlices()
    {
        foreach (var s in _shards)
        {
            foreach (var e in s.Buffer.EntriesOf(s.Bucket))
            {
                long from = Math.Max(e.Offset, s.Start), to = Math.Min(e.Offset + e.Numel, s.Start + s.Length);
                if (from >= to) continue;
                yield return new OptimizerStateSlice(s.Buffer, e, from - e.Offset, to - from,
                    s.Main.narrow(0, from - s.Start, to - from), s.ExpAvg.narrow(0, from - s.Start, to - from), s.ExpAvgSq.narrow(0, from - s.Start, to - from));
            }
        }
    }

    /// <summary>Sets Adam's step count (bias corrections) to a restored checkpoint's.</summary>
    public void RestoreSteps(int steps)
    {
        if (steps < 0) throw new ArgumentOutOfRangeException(nameof(steps), steps, "A step count is never negative.");
        _step = steps;
    }

    /// <summary>
    /// Whether this rank's copy of a buffer's state is the one a checkpoint keeps: sharded, every member owns its own
    /// shard; unsharded, every member holds the same whole state and the group's first member writes it.
    /// </summary>
    public bool WritesStateOf(GradientBuffer buffer) => Sharded || buffer.Group.Rank == 0;

    /// <summary>The global L2 norm of the reduced gradients (collective over the world).</summary>
    public double GradientNorm()
    {
        using var scope = torch.NewDisposeScope();
        var device = _shards[0].Main.device;
        var sum = torch.zeros(1, dtype: ScalarType.Float64, device: device);
        foreach (var s in _shards.Where(s => s.CountsInNorm))
        {
            var g = s.Gradient();
            foreach (var (from, length) in s.NormRuns)
                foreach (var (at, n) in Chunks(from, length))
                {
                    // Each chunk's square goes with its scope (in the method's scope they all stayed: 13 GiB for two 8x7B layers).
                    using var chunk = torch.NewDisposeScope();
                    sum.add_(g.narrow(0, at, n).square().sum(type: ScalarType.Float64));   // accumulated in fp64: the same to rounding however it is chunked
                }
        }
        var reduced = sum.to(_world.DeviceForScalars);
        _world.AllReduce(reduced);
        return Math.Sqrt(reduced.item<double>());
    }

    /// <summary>
    /// One AdamW step at <paramref name="lr"/> on every shard, with the gradients multiplied by
    /// <paramref name="gradientFactor"/> (the clipping coefficient, 1 when not clipping), then the updated
    /// parameters written back into the model (all-gathered when sharded).
    /// </summary>
    public void Step(double lr, double gradientFactor)
    {
        _step++;
        double b1 = _adam.Beta1, b2 = _adam.Beta2;
        double correction1 = 1 - Math.Pow(b1, _step);
        double correction2Sqrt = Math.Sqrt(1 - Math.Pow(b2, _step));
        using var _ = torch.no_grad();
        // Decoupled weight decay: p·(1 − lr·wd) on the decayed runs, the factor rounded as fp32 arithmetic rounds it.
        double decay = 1f - (float)(lr * _adam.WeightDecay);
        foreach (var s in _shards)
        {
            using var scope = torch.NewDisposeScope();
            if (_adam.WeightDecay != 0)
                foreach (var (from, length) in s.DecayRuns)
                    foreach (var (at, n) in Chunks(from, length)) s.Main.narrow(0, at, n).mul_(decay);
            // Element-wise, so chunk by chunk: the temporaries (the clipped gradient, the denominator) stay small.
            foreach (var (at, n) in Chunks(0, s.Length))
            {
                using var chunk = torch.NewDisposeScope();
                var g = s.Gradient().narrow(0, at, n);
                if (gradientFactor != 1.0) g = g * gradientFactor;
                var (main, m, v) = (s.Main.narrow(0, at, n), s.ExpAvg.narrow(0, at, n), s.ExpAvgSq.narrow(0, at, n));
                m.lerp_(g, 1 - b1);
                v.mul_(b2).addcmul_(g, g, 1 - b2);
                var denominator = (v.sqrt() / correction2Sqrt).add_(_adam.Eps);
                main.addcdiv_(m, denominator, -lr / correction1);
            }
        }
        WriteBack();
    }

    /// <summary>Copies the main parameters into the model: each bucket's shards gathered over the group, in the parameters' dtype.</summary>
    private void WriteBack()
    {
        foreach (var s in _shards)
        {
            using var scope = torch.NewDisposeScope();
            var buffer = s.Buffer;
            var b = s.Bucket;
            var device = s.Main.device;
            if (!Sharded || buffer.Group.Size == 1)
            {
                // This rank holds the whole bucket: straight into the parameters (copy_ rounds as .to(dtype) does).
                foreach (var e in buffer.EntriesOf(b))
                    e.Parameter.detach().view(-1).copy_(s.Main.narrow(0, e.Offset - s.Start, e.Numel));
                continue;
            }
            var whole = torch.empty(b.Length, dtype: buffer.ParameterDtype, device: device);
            buffer.Group.AllGather(s.Main.to(buffer.ParameterDtype), whole);
            foreach (var e in buffer.EntriesOf(b))
                e.Parameter.copy_(whole.narrow(0, e.Offset - b.Start, e.Numel).view(e.Parameter.shape));
        }
    }

    /// <summary>[from, from + length) in pieces of the chunk size (2^28 elements by default: 1 GiB of fp32 temporaries at most per operation).</summary>
    private IEnumerable<(long At, long Length)> Chunks(long from, long length)
    {
        for (long at = from; at < from + length; at += _chunkElements) yield return (at, Math.Min(_chunkElements, from + length - at));
    }

    /// <summary>The fp32 main parameters of elements [start, start + length) of a buffer (padding zero), copied from the parameters.</summary>
    private static Tensor MainParameters(GradientBuffer buffer, long start, long length)
    {
        var main = torch.zeros(length, dtype: ScalarType.Float32, device: buffer.MainGrad.device);
        foreach (var e in buffer.Entries)
        {
            long from = Math.Max(e.Offset, start), to = Math.Min(e.Offset + e.Numel, start + length);
            if (from < to) main.narrow(0, from - start, to - from).copy_(e.Parameter.detach().view(-1).narrow(0, from - e.Offset, to - from));
        }
        return main;
    }

    /// <summary>
    /// The runs (first element, count; relative to <paramref name="start"/>, adjacent runs merged) of [start, start + length)
    /// covered by each entry's own runs <paramref name="of"/> (relative to the entry). Held instead of a mask the size of the
    /// shard: two fp32 masks cost 8 bytes a parameter, as much as Adam's two moments.
    /// </summary>
    private static List<(long From, long Length)> Runs(GradientBuffer buffer, long start, long length, Func<BufferEntry, IEnumerable<(long First, long Count)>> of)
    {
        var runs = new List<(long From, long Length)>();
        foreach (var e in buffer.Entries.OrderBy(e => e.Offset))
            foreach (var (first, count) in of(e).OrderBy(r => r.First))
            {
                long from = Math.Max(e.Offset + first, start), to = Math.Min(e.Offset + first + count, start + length);
                if (from >= to) continue;
                if (runs.Count > 0 && runs[^1].From + runs[^1].Length == from - start)
                    runs[^1] = (runs[^1].From, runs[^1].Length + to - from);
                else runs.Add((from - start, to - from));
            }
        return runs;
    }

    /// <summary>The elements of an entry this rank counts in the norm: all of a counted one but its <see cref="BufferEntry.Uncounted"/> runs.</summary>
    private static IEnumerable<(long First, long Count)> CountedRuns(BufferEntry e)
    {
        if (!e.CountedInNorm) yield break;
        long at = 0;
        foreach (var (first, count) in e.Uncounted.OrderBy(u => u.Start))
        {
            if (first > at) yield return (at, first - at);
            at = Math.Max(at, first + count);
        }
        if (at < e.Numel) yield return (at, e.Numel - at);
    }

    public void Dispose()
    {
        foreach (var s in _shards) s.Dispose();
        _shards.Clear();
    }

    /// <summary>One shard's state: fp32 main parameters and Adam moments, and the runs weight decay and the norm cover.</summary>
    private sealed class ShardState(GradientBuffer buffer, GradientBucket bucket, long start, long length, Tensor main,
        List<(long From, long Length)> decayRuns, List<(long From, long Length)> normRuns, bool countsInNorm) : IDisposable
    {
        public GradientBuffer Buffer { get; } = buffer;
        public GradientBucket Bucket { get; } = bucket;
        public long Start { get; } = start;
        public long Length { get; } = length;
        public Tensor Main { get; } = main;
        public Tensor ExpAvg { get; } = torch.zeros_like(main);
        public Tensor ExpAvgSq { get; } = torch.zeros_like(main);
        /// <summary>Runs of the shard (relative to <see cref="Start"/>) whose parameters decay.</summary>
        public List<(long From, long Length)> DecayRuns { get; } = decayRuns;
        /// <summary>Runs of the shard this rank counts in the gradient norm.</summary>
        public List<(long From, long Length)> NormRuns { get; } = normRuns;
        public bool CountsInNorm { get; } = countsInNorm;

        /// <summary>The reduced fp32 gradient of this shard (a view of the buffer).</summary>
        public Tensor Gradient() => Buffer.MainGrad.narrow(0, Start, Length);

        public void Dispose()
        {
            Main.Dispose();
            ExpAvg.Dispose();
            ExpAvgSq.Dispose();
        }
    }
}
