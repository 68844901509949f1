using Moe.Runtime.Data;
using Xunit;

namespace Moe.Data.Tests;

/// <summary>Packed samples with Megatron's masks (gpt_dataset._get_ltor_masks_and_position_ids), checked by hand.</summary>
public class PackingTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-pack-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private IndexedDataset Write(params int[][] documents)
    {
        string prefix = Path.Combine(_dir, "d_text_document");
        using (var b = new IndexedDatasetBuilder(prefix, IndexedDtype.UInt16))
        {
            foreach (var d in documents)
            {
                b.AddSequence(d);
                b.EndDocument();
            }
            b.Finish();
        }
        return IndexedDataset.Open(prefix);
    }

    private static long[][] Windows(GptDataset ds, int count) =>
        [.. Enumerable.Range(0, count).Select(i => ds.Sample(i)).Select(x => x.Tokens.Append(x.Labels[^1]).ToArray()).OrderBy(w => w[0])];

    [Fact]
    public void OneSequence_SamplesOfSPlusOneTokensOverlapByOne()
    {
        // Megatron's sample index: sample i covers stream tokens [i*S, i*S + S] (S + 1 tokens), so the last
        // token of one sample is the first of the next. Stream 10..19, S = 3, 3 samples (3*3 + 1 = 10 tokens).
        using var data = Write(Enumerable.Range(10, 10).ToArray());
        var ds = new GptDataset(data, (0, 1), 3, new SampleOptions(3, 2, false, false, false), seed: 5);
        Assert.Equal(3, ds.SampleCount);
        Assert.Equal([[10, 11, 12, 13], [13, 14, 15, 16], [16, 17, 18, 19]], Windows(ds, 3));
    }

    [Fact]
    public void TwoDocuments_PackAcrossTheBoundaryWithMegatronsMasks()
    {
        // Documents A = 10 11 2 and B = 20 21 22 2 (eod 2), S = 3, 2 samples = 7 tokens = one epoch.
        // Whatever the seeded epoch order, the stream is A B or B A, cut at tokens 0..3 and 3..6.
        using var data = Write([10, 11, 2], [20, 21, 22, 2]);
        var options = new SampleOptions(3, 2, ResetPositionIds: true, ResetAttentionMask: true, EodMaskLoss: true);
        var ds = new GptDataset(data, (0, 2), 2, options, seed: 11);
        var windows = Windows(ds, 2);
        long[][] ab = [[10, 11, 2, 20], [20, 21, 22, 2]], ba = [[2, 10, 11, 2], [20, 21, 22, 2]];
        Assert.True(windows.SequenceEqual(ab, new SeqEq()) || windows.SequenceEqual(ba, new SeqEq()), string.Join(" | ", windows.Select(w => string.Join(",", w))));

        // The window that crosses the boundary: inputs x y 2 | next document.
        var crossing = Enumerable.Range(0, 2).Select(i => ds.Sample(i)).Single(x => x.Tokens[0] != 20);
        if (crossing.Tokens[0] == 10)
        {
            // inputs 10 11 2, labels 11 2 20: EOD is the last input, so nothing after it in this sample.
            Assert.Equal(new long[] { 0, 1, 2 }, crossing.PositionIds);
            Assert.Equal(new float[] { 1, 1, 0 }, crossing.LossMask);
            Assert.Equal(new long[] { 0, 0, 0 }, crossing.DocumentIds);
        }
        else
        {
            // inputs 2 10 11 (the EOD ending B, then A): positions restart after the EOD, a new document begins.
            Assert.Equal(new long[] { 0, 0, 1 }, crossing.PositionIds);
            Assert.Equal(new float[] { 0, 1, 1 }, crossing.LossMask);
            Assert.Equal(new long[] { 0, 1, 1 }, crossing.DocumentIds);
        }
    }

    [Fact]
    public void EmptyDocument_HasNoSequenceAndPacksLikeItsAbsence()
    {
        // A, an empty document (a boundary with no sequence, as preprocess_data.py writes it), B: the
        // dataset has two sequences, and samples over them are exactly the samples of A and B alone.
        string prefix = Path.Combine(_dir, "e_text_document");
        using (var b = new IndexedDatasetBuilder(prefix, IndexedDtype.UInt16))
        {
            b.AddSequence([10, 11, 2]);
            b.EndDocument();
            b.EndDocument();
            b.AddSequence([20, 21, 22, 2]);
            b.EndDocument();
            b.Finish();
        }
        using var withEmpty = IndexedDataset.Open(prefix);
        Assert.Equal(new long[] { 0, 1, 1, 2 }, withEmpty.DocumentIndices);
        Assert.Equal(2, withEmpty.SequenceCount);
        using var without = Write([10, 11, 2], [20, 21, 22, 2]);
        var options = new SampleOptions(3, 2, true, true, true);
        var a = new GptDataset(withEmpty, (0, withEmpty.SequenceCount), 2, options, seed: 11);
        var c = new GptDataset(without, (0, without.SequenceCount), 2, options, seed: 11);
        Assert.Equal(Windows(c, 2), Windows(a, 2));
    }

    [Fact]
    public void SeedChoosesTheEpochOrder_BothOrdersOccur()
    {
        // Guards the previous test against a shuffle that never reorders: over 20 seeds both A-first and B-first appear.
        using var data = Write([10, 11, 2], [20, 21, 22, 2]);
        var options = new SampleOptions(3, 2, false, false, false);
        var firsts = Enumerable.Range(0, 20).Select(seed => Windows(new GptDataset(data, (0, 2), 2, options, seed), 2)[0][0]).ToHashSet();
        Assert.Equal(new HashSet<long> { 2, 10 }, firsts);
    }

    [Fact]
    public void BatchIterator_LaysSamplesOutRowMajorInSampleOrder()
    {
        // Stream 10..19, S = 3: the three windows of OneSequence_... in the dataset's sample order, as [B, S] rows.
        using var data = Write(Enumerable.Range(10, 10).ToArray());
        var ds = new GptDataset(data, (0, 1), 3, new SampleOptions(3, 2, false, false, false), seed: 5);
        var it = new GptBatchIterator(ds);
        var first = it.Next(2);
        var second = it.Next(1);
        Assert.Equal(3, it.Position);
        Assert.Equal((2, 3), (first.BatchSize, first.SequenceLength));
        long[][] rows = [first.Tokens[..3], first.Tokens[3..], second.Tokens];
        Assert.Equal([[10, 11, 12], [13, 14, 15], [16, 17, 18]], rows.OrderBy(r => r[0]));
        for (int r = 0; r < 3; r++)
        {
            // Labels are each row's tokens shifted by one; positions 0 1 2 without resets.
            var tokens = r < 2 ? first.Tokens[(r * 3)..(r * 3 + 3)] : second.Tokens;
            var labels = r < 2 ? first.Labels[(r * 3)..(r * 3 + 3)] : second.Labels;
            Assert.Equal(tokens.Select(t => t + 1), labels);
        }
        Assert.Equal(new long[] { 0, 1, 2, 0, 1, 2 }, first.PositionIds);
        Assert.Throws<ArgumentOutOfRangeException>(() => it.Next(1));
    }

    private sealed class SeqEq : IEqualityComparer<long[]>
    {
        public bool Equals(long[]? x, long[]? y) => x!.SequenceEqual(y!);
        public int GetHashCode(long[] obj) => obj.Length;
    }

    // Window of S + 1 = 9 tokens crossing two end-of-document tokens (eod = 2): doc A = 10 11 2, doc B = 12 2, doc C = 13 14 15 16.
    private static readonly long[] Window = [10, 11, 2, 12, 2, 13, 14, 15, 16];

    [Fact]
    public void InputsAndLabels_AreShiftedByOne()
    {
        var s = GptDataset.Build(Window, new SampleOptions(8, 2, false, false, false));
        Assert.Equal(new long[] { 10, 11, 2, 12, 2, 13, 14, 15 }, s.Tokens);
        Assert.Equal(new long[] { 11, 2, 12, 2, 13, 14, 15, 16 }, s.Labels);
        Assert.Equal(Enumerable.Range(0, 8).Select(i => (long)i), s.PositionIds);
        Assert.All(s.LossMask, m => Assert.Equal(1f, m));
        Assert.All(s.DocumentIds, d => Assert.Equal(0L, d));
    }

    [Fact]
    public void ResetPositionIds_RestartAfterEachEod()
    {
        var s = GptDataset.Build(Window, new SampleOptions(8, 2, true, false, false));
        Assert.Equal(new long[] { 0, 1, 2, 0, 1, 0, 1, 2 }, s.PositionIds);
    }

    [Fact]
    public void ResetAttentionMask_GivesEachDocumentItsOwnId()
    {
        var s = GptDataset.Build(Window, new SampleOptions(8, 2, false, true, false));
        Assert.Equal(new long[] { 0, 0, 0, 1, 1, 2, 2, 2 }, s.DocumentIds);
    }

    [Fact]
    public void EodMaskLoss_ZeroesPositionsWhoseInputIsEod()
    {
        var s = GptDataset.Build(Window, new SampleOptions(8, 2, false, false, true));
        Assert.Equal(new float[] { 1, 1, 0, 1, 0, 1, 1, 1 }, s.LossMask);
    }

    [Fact]
    public void DocumentCausalMask_MatchesMegatronsResetAttentionMask()
    {
        // Megatron: lower-triangular, then for each eod at i: mask[i+1:, :i+1] = 0.
        var s = GptDataset.Build(Window, new SampleOptions(8, 2, false, true, false));
        var mask = Moe.Runtime.Modeling.MixtralModel.DocumentCausalMask(TorchSharp.torch.tensor(s.DocumentIds).unsqueeze(0));
        var expected = new bool[8, 8];
        for (int i = 0; i < 8; i++) for (int j = 0; j <= i; j++) expected[i, j] = true;
        foreach (int eod in new[] { 2, 4 })
            for (int i = eod + 1; i < 8; i++) for (int j = 0; j <= eod; j++) expected[i, j] = false;
        var actual = mask.squeeze(0).squeeze(0).data<bool>().ToArray();
        Assert.Equal(expected.Cast<bool>(), actual);
    }

    [Fact]
    public void Samples_AreSeededAndCoverTheStream()
    {
        using var ds = IndexedDataset.Open(Moe.Tests.TestPaths.Fixture("tokenizer-bpe-1k", "megatron_text_document"));
        var options = new SampleOptions(16, 2, true, true, true);
        var a = new GptDataset(ds, (0, ds.SequenceCount), 50, options, seed: 7);
        var b = new GptDataset(ds, (0, ds.SequenceCount), 50, options, seed: 7);
        var c = new GptDataset(ds, (0, ds.SequenceCount), 50, options, seed: 8);
        Assert.Equal(a.Sample(3).Tokens, b.Sample(3).Tokens);
        Assert.NotEqual(Enumerable.Range(0, 50).SelectMany(i => a.Sample(i).Tokens), Enumerable.Range(0, 50).SelectMany(i => c.Sample(i).Tokens));
    }
}
