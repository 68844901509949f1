using Moe.Runtime.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Checkpoints;

// Shapes: G the whole tensor's (global) shape, L a rank's block of it, n the elements of a flat range of the block.

/// <summary>
/// Elements [<see cref="Start"/>, <see cref="End"/>) of one block of a whole tensor, counted in the block's row-major
/// order: a rank's weights (the whole block) or its distributed-optimizer slice of a parameter (a flat range, which
/// in general is not a rectangle of the whole tensor). Both sides of a resharding copy are described this way.
/// </summary>
/// <param name="GlobalShape">The whole tensor's shape as the model views it (the same in every layout).</param>
/// <param name="LocalShape">The block's shape.</param>
/// <param name="Offsets">Where the block starts in the whole tensor.</param>
/// <param name="Start">First element of the range, in the block's flat order.</param>
/// <param name="End">One past the last.</param>
public sealed record BlockRange(long[] GlobalShape, long[] LocalShape, long[] Offsets, long Start, long End)
{
    /// <summary>Elements in the range.</summary>
    public long Length => End - Start;

    /// <summary>The whole block of <paramref name="shard"/>.</summary>
    public static BlockRange Whole(TensorShard shard) => new(shard.GlobalShape, shard.LocalShape, shard.Offsets, 0, Volume(shard.LocalShape));

    /// <summary>Elements [start, end) of <paramref name="shard"/>'s block.</summary>
    public static BlockRange Of(TensorShard shard, long start, long end) => new(shard.GlobalShape, shard.LocalShape, shard.Offsets, start, end);

    /// <summary>Elements of a shape.</summary>
    public static long Volume(IEnumerable<long> shape) => shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>
/// Copies between two <see cref="BlockRange"/>s of the same whole tensor — what loading at another layout needs:
/// expert-parallel blocks (dimension 0 of the experts' tensors), expert-tensor-parallel FFN slices (an inner
/// dimension), and optimizer shards that are flat ranges cutting through rows. A flat range of a row-major block is
/// a union of at most 2·rank − 1 hyper-rectangles, each contiguous in memory (a prefix of fixed indices, a run along
/// one dimension, all of the trailing ones); two ranges intersect rectangle by rectangle, and each intersection is
/// one strided copy between views — no index tensors, no copy of anything outside the intersection.
/// </summary>
public static class BlockCopy
{
    /// <summary>A contiguous rectangle of a range: its first element (relative to the range's start) and its corner and extent in the whole tensor.</summary>
    public sealed record Piece(long FlatStart, long[] Low, long[] Shape);

    /// <summary>
    /// Copies into <paramref name="destination"/> (the elements of <paramref name="to"/>, any shape, contiguous) every
    /// element of <paramref name="source"/> (the elements of <paramref name="from"/>) that both ranges hold; returns
    /// how many. The caller sums the counts over all sources to check the destination was covered exactly once.
    /// </summary>
    public static long Copy(Tensor destination, BlockRange to, Tensor source, BlockRange from)
    {
        if (!to.GlobalShape.SequenceEqual(from.GlobalShape))
            throw new ArgumentException($"Ranges of different tensors: [{string.Join(", ", to.GlobalShape)}] and [{string.Join(", ", from.GlobalShape)}].");
        if (destination.NumberOfElements != to.Length || source.NumberOfElements != from.Length)
            throw new ArgumentException($"Tensors of {destination.NumberOfElements} and {source.NumberOfElements} elements for ranges of {to.Length} and {from.Length}.");
        if (!Intersects(to, from)) return 0;
        using var scope = torch.NewDisposeScope();
        var dst = destination.view(-1);   // contiguous: a view, so writes land in the caller's tensor
        var src = source.reshape(-1);
        long copied = 0;
        var sourcePieces = Pieces(from).ToList();
        foreach (var d in Pieces(to))
        {
            foreach (var s in sourcePieces)
            {
                int rank = d.Low.Length;
                var low = new long[rank];
                var extent = new long[rank];
                bool empty = false;
                for (int i = 0; i < rank; i++)
                {
                    low[i] = Math.Max(d.Low[i], s.Low[i]);
                    extent[i] = Math.Min(d.Low[i] + d.Shape[i], s.Low[i] + s.Shape[i]) - low[i];
                    if (extent[i] <= 0) { empty = true; break; }
                }
                if (empty) continue;
                var dv = Window(dst, d, low, extent);
                var sv = Window(src, s, low, extent);
                dv.copy_(sv);
                copied += BlockRange.Volume(extent);
            }
        }
        return copied;
    }

    /// <summary>How many elements two ranges of one whole tensor share.</summary>
    public static long Overlap(BlockRange a, BlockRange b)
    {
        if (!Intersects(a, b)) return 0;
        long shared = 0;
        var bPieces = Pieces(b).ToList();
        foreach (var p in Pieces(a))
            foreach (var q in bPieces)
            {
                long volume = 1;
                for (int i = 0; i < p.Low.Length && volume > 0; i++)
                    volume *= Math.Max(0, Math.Min(p.Low[i] + p.Shape[i], q.Low[i] + q.Shape[i]) - Math.Max(p.Low[i], q.Low[i]));
                shared += volume;
            }
        return shared;
    }

    /// <summary>Whether the blocks' bounding boxes meet (a cheap test before cutting ranges into pieces).</summary>
    private static bool Intersects(BlockRange a, BlockRange b)
    {
        if (a.Length == 0 || b.Length == 0) return false;
        for (int i = 0; i < a.GlobalShape.Length; i++)
            if (Math.Max(a.Offsets[i], b.Offsets[i]) >= Math.Min(a.Offsets[i] + a.LocalShape[i], b.Offsets[i] + b.LocalShape[i])) return false;
        return true;
    }

    /// <summary>The view of the rectangle [low, low + extent) (whole-tensor coordinates) inside a piece of a flat range tensor.</summary>
    private static Tensor Window(Tensor flat, Piece p, long[] low, long[] extent)
    {
        var t = flat.narrow(0, p.FlatStart, BlockRange.Volume(p.Shape)).view(p.Shape);
        for (int i = 0; i < low.Length; i++)
            if (extent[i] != p.Shape[i]) t = t.narrow(i, low[i] - p.Low[i], extent[i]);
        return t;
    }

    /// <summary>
    /// A flat range of a block as contiguous rectangles, in order: at each dimension the range is a partial run of
    /// the first index, whole indices, and a partial run of the last; each partial run recurses one dimension deeper.
    /// </summary>
    public static IEnumerable<Piece> Pieces(BlockRange r)
    {
        var pieces = new List<Piece>();
        if (r.Length > 0) Cut(r, 0, new long[r.LocalShape.Length], r.Start, r.End, pieces);
        return pieces;
    }

    private static void Cut(BlockRange r, int dim, long[] prefix, long low, long high, List<Piece> pieces)
    {
        // [low, high) counts elements of the sub-block below prefix[0..dim), whose stride at `dim` is `stride`.
        if (low >= high) return;
        var shape = r.LocalShape;
        long stride = BlockRange.Volume(shape.Skip(dim + 1));
        long first = low / stride, firstRest = low % stride, last = high / stride, lastRest = high % stride;
        if (first == last)
        {
            prefix[dim] = first;
            Cut(r, dim + 1, prefix, firstRest, lastRest, pieces);
            return;
        }
        if (firstRest != 0)
        {
            prefix[dim] = first;
            Cut(r, dim + 1, prefix, firstRest, stride, pieces);
            first++;
        }
        if (last > first) pieces.Add(Make(r, dim, prefix, first, last - first));
        if (lastRest != 0)
        {
            prefix[dim] = last;
            Cut(r, dim + 1, prefix, 0, lastRest, pieces);
        }
    }

    /// <summary>The rectangle: indices prefix[0..dim) fixed, [from, from + count) along dim, all of the trailing dimensions.</summary>
    private static Piece Make(BlockRange r, int dim, long[] prefix, long from, long count)
    {
        int rank = r.LocalShape.Length;
        var low = new long[rank];
        var shape = new long[rank];
        long flat = 0, stride = 1;
        for (int i = rank - 1; i >= 0; i--)
        {
            long local = i < dim ? prefix[i] : i == dim ? from : 0;
            shape[i] = i < dim ? 1 : i == dim ? count : r.LocalShape[i];
            low[i] = r.Offsets[i] + local;
            flat += local * stride;
            stride *= r.LocalShape[i];
        }
        return new Piece(flat - r.Start, low, shape);
    }
}
