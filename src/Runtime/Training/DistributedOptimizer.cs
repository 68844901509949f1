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

    public DistributedOptimizer(IReadOnlyList<GradientBuffer> buffers, Communicator world, AdamSettings adam, bool sharded)
    {
        _world = world;
        _adam = adam;
        Sharded = sharded;
        Buffers = buffers;
        using var _ = torch.no_grad();
        foreach (var buffer in buffers)
        {
            using var flat = Flatten(buffer);
            foreach (var bucket in buffer.Buckets)
            {
                var (start, length) = sharded ? buffer.Shard(bucket) : (bucket.Start, bucket.Length);
                var state = new ShardState(buffer, bucket, start, length,
                    flat.narrow(0, start, length).clone(),
                    Mask(buffer, start, length, e => e.Decays),
                    NormMask(buffer, start, length),
                    countsInNorm: sharded || buffer.Group.Rank == 0);
                _shards.Add(state);
            }
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
            sum += (g * g * s.NormMask).sum().to(ScalarType.Float64);
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
        foreach (var s in _shards)
        {
            using var scope = torch.NewDisposeScope();
            var g = s.Gradient();
            if (gradientFactor != 1.0) g = g * gradientFactor;
            if (_adam.WeightDecay != 0) s.Main.mul_(1 - lr * _adam.WeightDecay * s.DecayMask);
            s.ExpAvg.lerp_(g, 1 - b1);
            s.ExpAvgSq.mul_(b2).addcmul_(g, g, 1 - b2);
            var denominator = (s.ExpAvgSq.sqrt() / correction2Sqrt).add_(_adam.Eps);
            s.Main.addcdiv_(s.ExpAvg, denominator, -lr / correction1);
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
            Tensor whole;
            if (Sharded)
            {
                whole = torch.empty(b.Length, dtype: buffer.ParameterDtype, device: device);
                buffer.Group.AllGather(s.Main.to(buffer.ParameterDtype), whole);
            }
            else
            {
                whole = s.Main.to(buffer.ParameterDtype);
            }
            foreach (var e in buffer.EntriesOf(b))
                e.Parameter.copy_(whole.narrow(0, e.Offset - b.Start, e.Numel).view(e.Parameter.shape));
        }
    }

    /// <summary>Every parameter of a buffer at its offset, in fp32 (padding zero).</summary>
    private static Tensor Flatten(GradientBuffer buffer)
    {
        var device = buffer.Entries[0].Parameter.device;
        var flat = torch.zeros(buffer.Length, dtype: ScalarType.Float32, device: device);
        foreach (var e in buffer.Entries)
            flat.narrow(0, e.Offset, e.Numel).copy_(e.Parameter.detach().flatten());
        return flat;
    }

    /// <summary>1 on the elements of [start, start + length) whose parameter satisfies <paramref name="on"/>, 0 elsewhere (padding included).</summary>
    private static Tensor Mask(GradientBuffer buffer, long start, long length, Func<BufferEntry, bool> on)
    {
        var mask = torch.zeros(length, dtype: ScalarType.Float32, device: buffer.MainGrad.device);
        foreach (var e in buffer.Entries.Where(on))
        {
            long from = Math.Max(e.Offset, start), to = Math.Min(e.Offset + e.Numel, start + length);
            if (from < to) mask.narrow(0, from - start, to - from).fill_(1);
        }
        return mask;
    }

    /// <summary>The counted parameters' mask (<see cref="Mask"/>) with each entry's <see cref="BufferEntry.Uncounted"/> runs cleared.</summary>
    private static Tensor NormMask(GradientBuffer buffer, long start, long length)
    {
        var mask = Mask(buffer, start, length, e => e.CountedInNorm);
        foreach (var e in buffer.Entries)
            foreach (var (first, count) in e.Uncounted)
            {
                long from = Math.Max(e.Offset + first, start), to = Math.Min(e.Offset + first + count, start + length);
                if (from < to) mask.narrow(0, from - start, to - from).zero_();
            }
        return mask;
    }

    public void Dispose()
    {
        foreach (var s in _shards) s.Dispose();
        _shards.Clear();
    }

    /// <summary>One shard's state: fp32 main parameters and Adam moments, and its masks.</summary>
    private sealed class ShardState(GradientBuffer buffer, GradientBucket bucket, long start, long length, Tensor main, Tensor decayMask, Tensor normMask, bool countsInNorm) : IDisposable
    {
        public GradientBuffer Buffer { get; } = buffer;
        public GradientBucket Bucket { get; } = bucket;
        public long Start { get; } = start;
        public long Length { get; } = length;
        public Tensor Main { get; } = main;
        public Tensor ExpAvg { get; } = torch.zeros_like(main);
        public Tensor ExpAvgSq { get; } = torch.zeros_like(main);
        public Tensor DecayMask { get; } = decayMask;
        public Tensor NormMask { get; } = normMask;
        public bool CountsInNorm { get; } = countsInNorm;

        /// <summary>The reduced fp32 gradient of this shard (a view of the buffer).</summary>
        public Tensor Gradient() => Buffer.MainGrad.narrow(0, Start, Length);

        public void Dispose()
        {
            Main.Dispose();
            ExpAvg.Dispose();
            ExpAvgSq.Dispose();
            DecayMask.Dispose();
            NormMask.Dispose();
        }
    }
}
