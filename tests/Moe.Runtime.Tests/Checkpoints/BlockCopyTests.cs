using Moe.Runtime.Checkpoints;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Checkpoints;

/// <summary>The resharding copy: flat ranges of blocks cut into rectangles, and copies between ranges of different layouts.</summary>
public class BlockCopyTests
{
    [Fact]
    public void FlatRange_IsCutIntoContiguousRectangles()
    {
        // Shape [2, 3, 4], elements [5, 19): by hand, element 5 is (0,1,1); the range is (0,1,1..3], row (0,2,·),
        // row (1,0,·) and (1,1,0..2] — 3 + 4 + 4 + 3 = 14 elements starting at offsets 0, 3, 7 and 11 of the range.
        var pieces = BlockCopy.Pieces(new BlockRange([2, 3, 4], [2, 3, 4], [0, 0, 0], 5, 19)).ToList();
        Assert.Equal(new long[] { 0, 3, 7, 11 }, pieces.Select(p => p.FlatStart));
        Assert.Equal(new[] { "0,1,1", "0,2,0", "1,0,0", "1,1,0" }, pieces.Select(p => string.Join(",", p.Low)));
        Assert.Equal(new[] { "1,1,3", "1,1,4", "1,1,4", "1,1,3" }, pieces.Select(p => string.Join(",", p.Shape)));
    }

    [Fact]
    public void Pieces_OfABlockAtAnOffset_AreInWholeTensorCoordinates()
    {
        // Block [2, 4] at (6, 0) of [10, 4], elements [2, 8): (6,2..3], (7,0..3].
        var pieces = BlockCopy.Pieces(new BlockRange([10, 4], [2, 4], [6, 0], 2, 8)).ToList();
        Assert.Equal(new[] { "6,2", "7,0" }, pieces.Select(p => string.Join(",", p.Low)));
        Assert.Equal(new[] { "1,2", "1,4" }, pieces.Select(p => string.Join(",", p.Shape)));
    }

    /// <summary>The values of a range of the tensor whose every element is its own flat index — computed element by element.</summary>
    private static float[] Values(BlockRange r)
    {
        int rank = r.GlobalShape.Length;
        var values = new float[r.Length];
        for (long k = r.Start; k < r.End; k++)
        {
            long rest = k, global = 0;
            var local = new long[rank];
            for (int d = rank - 1; d >= 0; d--)
            {
                local[d] = rest % r.LocalShape[d];
                rest /= r.LocalShape[d];
            }
            for (int d = 0; d < rank; d++) global = global * r.GlobalShape[d] + local[d] + r.Offsets[d];
            values[k - r.Start] = global;
        }
        return values;
    }

    [Fact]
    public void ExpertTensorParallelOptimizerSlices_FillAnExpertParallelRange()
    {
        // Whole [E=4, 2, I=6, H=5]; the source layout is EP 2 × ETP 2 (blocks [2, 2, 3, 5]), each block's state cut into
        // three flat slices as the distributed optimizer cuts buckets; the target is EP 4's expert 1 (block [1, 2, 6, 5]),
        // elements [7, 53) of it.
        long[] whole = [4, 2, 6, 5];
        var sources = new List<BlockRange>();
        foreach (long e in new long[] { 0, 2 })
            foreach (long i in new long[] { 0, 3 })
                foreach (var (a, b) in new[] { (0L, 17L), (17L, 40L), (40L, 60L) })
                    sources.Add(new BlockRange(whole, [2, 2, 3, 5], [e, 0, i, 0], a, b));
        var target = new BlockRange(whole, [1, 2, 6, 5], [1, 0, 0, 0], 7, 53);
        var into = torch.full(target.Length, -1f);
        long copied = sources.Sum(s => BlockCopy.Copy(into, target, torch.tensor(Values(s)), s));
        Assert.Equal(target.Length, copied);
        Assert.Equal(Values(target), into.data<float>().ToArray());
        Assert.Equal(target.Length, sources.Sum(s => BlockCopy.Overlap(target, s)));
    }

    [Fact]
    public void DisjointRanges_CopyNothing()
    {
        var a = new BlockRange([8, 4], [4, 4], [0, 0], 0, 16);
        var b = new BlockRange([8, 4], [4, 4], [4, 0], 0, 16);
        var into = torch.zeros(16);
        Assert.Equal(0, BlockCopy.Copy(into, a, torch.ones(16), b));
        Assert.Equal(0f, into.sum().item<float>());
    }
}
