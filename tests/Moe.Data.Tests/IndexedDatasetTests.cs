using Moe.Runtime;
using System.Text.Json;
using Moe.Runtime.Commands;
using Moe.Runtime.Data;
using Moe.Tests;
using Xunit;

namespace Moe.Data.Tests;

/// <summary>Megatron's MMIDIDX files (shared/fixtures/tokenizer-bpe-1k, written by Megatron-Core 0.20).</summary>
public class IndexedDatasetTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-idx-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static string FixturePrefix => TestPaths.Fixture("tokenizer-bpe-1k", "megatron_text_document");

    /// <summary>The same documents written by preprocess_data.py without --append-eod.</summary>
    private static string NoEodFixturePrefix => TestPaths.Fixture("tokenizer-bpe-1k", "megatron_noeod_text_document");

    private static (int[][] Ids, int Eod) ExpectedIds()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(TestPaths.Fixture("tokenizer-bpe-1k", "expected_ids.json")));
        var ids = doc.RootElement.GetProperty("ids").EnumerateArray().Select(d => d.EnumerateArray().Select(e => e.GetInt32()).ToArray()).ToArray();
        return (ids, doc.RootElement.GetProperty("eod").GetInt32());
    }

    /// <summary>What Megatron writes for one document: nothing when it has no token, else one sequence (EOD appended on request).</summary>
    private static int[][] SequencesOf(int[] doc, bool appendEod, int eod) =>
        doc.Length == 0 ? [] : [appendEod ? [.. doc, eod] : doc];

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Reader_SeesMegatronsSequencesAndDocuments(bool appendEod)
    {
        var (ids, eod) = ExpectedIds();
        using var ds = IndexedDataset.Open(appendEod ? FixturePrefix : NoEodFixturePrefix);
        Assert.Equal(IndexedDtype.UInt16, ds.Dtype);
        Assert.Equal(ids.Length, ds.DocumentIndices.Length - 1);
        // Document 9 is empty: a document of zero sequences (two equal consecutive document indices), no
        // lone EOD, with or without --append-eod. Every other document is one sequence.
        Assert.Equal(9, Array.FindIndex(ids, d => d.Length == 0));
        Assert.Equal(ids.Count(d => d.Length > 0), ds.SequenceCount);
        for (int d = 0; d < ids.Length; d++)
        {
            var expected = SequencesOf(ids[d], appendEod, eod);
            Assert.Equal(expected.Length, ds.DocumentIndices[d + 1] - ds.DocumentIndices[d]);
            for (int q = 0; q < expected.Length; q++)
                Assert.Equal(expected[q].Select(i => (long)i), ds.Read((int)ds.DocumentIndices[d] + q));
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Builder_ReproducesMegatronsFilesByteForByte(bool appendEod)
    {
        var (ids, eod) = ExpectedIds();
        string prefix = Path.Combine(_dir, "out_text_document");
        using (var b = new IndexedDatasetBuilder(prefix, IndexedDataset.DtypeForVocabulary(1000)))
        {
            foreach (var doc in ids)
            {
                foreach (var sequence in SequencesOf(doc, appendEod, eod)) b.AddSequence(sequence);
                b.EndDocument();
            }
            b.Finish();
        }
        string fixture = appendEod ? FixturePrefix : NoEodFixturePrefix;
        Assert.Equal(File.ReadAllBytes(fixture + ".idx"), File.ReadAllBytes(prefix + ".idx"));
        Assert.Equal(File.ReadAllBytes(fixture + ".bin"), File.ReadAllBytes(prefix + ".bin"));
    }

    [Fact]
    public void UnfinishedBuilder_LeavesNothingThatLooksWhole()
    {
        string prefix = Path.Combine(_dir, "partial");
        using (var b = new IndexedDatasetBuilder(prefix, IndexedDtype.UInt16))
        {
            b.AddSequence(new[] { 5, 6, 7 });
            b.EndDocument();
        }
        Assert.Empty(Directory.GetFiles(_dir));
    }

    private static void WriteOld(string prefix, int token)
    {
        File.WriteAllBytes(prefix + ".bin", [(byte)token, 0]);
        File.WriteAllBytes(prefix + ".idx", [.. "OLD"u8]);
    }

    [Fact]
    public void CompletedButUncommitted_LeavesEarlierPairsUntouchedAndNoTemporaryFiles()
    {
        // A run that fails after writing its temporary files but before Commit (e.g. the second key fails):
        // the earlier run's pairs stay exactly as they were, nothing new appears.
        string a = Path.Combine(_dir, "a"), b = Path.Combine(_dir, "b");
        WriteOld(a, 1);
        WriteOld(b, 2);
        using (var ba = new IndexedDatasetBuilder(a, IndexedDtype.UInt16))
        using (var bb = new IndexedDatasetBuilder(b, IndexedDtype.UInt8))
        {
            ba.AddSequence([5, 6]);
            ba.EndDocument();
            bb.AddBytes([0, 1]);
            bb.EndDocument();
            ba.Complete();
            bb.Complete();
        }
        Assert.Equal(["a.bin", "a.idx", "b.bin", "b.idx"], Directory.GetFiles(_dir).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        Assert.Equal("OLD"u8.ToArray(), File.ReadAllBytes(a + ".idx"));
        Assert.Equal(new byte[] { 2, 0 }, File.ReadAllBytes(b + ".bin"));
    }

    [Fact]
    public void CommitOfTwoDatasets_ReplacesBothEarlierPairs()
    {
        string a = Path.Combine(_dir, "a"), b = Path.Combine(_dir, "b");
        WriteOld(a, 1);
        WriteOld(b, 2);
        using var ba = new IndexedDatasetBuilder(a, IndexedDtype.UInt16);
        using var bb = new IndexedDatasetBuilder(b, IndexedDtype.UInt8);
        ba.AddSequence([5, 6]);
        ba.EndDocument();
        bb.AddBytes([0, 1]);
        bb.EndDocument();
        ba.Complete();
        bb.Complete();
        IndexedDatasetBuilder.Commit([ba, bb]);
        Assert.Equal(["a.bin", "a.idx", "b.bin", "b.idx"], Directory.GetFiles(_dir).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        // uint16 little-endian 5, 6 and the uint8 mask 0, 1; one sequence each of length 2.
        Assert.Equal(new byte[] { 5, 0, 6, 0 }, File.ReadAllBytes(a + ".bin"));
        Assert.Equal(new byte[] { 0, 1 }, File.ReadAllBytes(b + ".bin"));
        using var da = IndexedDataset.Open(a);
        using var db = IndexedDataset.Open(b);
        Assert.Equal(new[] { 2 }, da.Lengths);
        Assert.Equal(new long[] { 0, 1 }, db.Read(0));
    }

    [Fact]
    public void TruncatedBin_IsANamedError()
    {
        string prefix = Path.Combine(_dir, "cut");
        File.Copy(FixturePrefix + ".idx", prefix + ".idx");
        File.WriteAllBytes(prefix + ".bin", File.ReadAllBytes(FixturePrefix + ".bin")[..1000]);
        var e = Assert.Throws<UserError>(() => IndexedDataset.Open(prefix));
        Assert.Contains("cut.bin: sequence", e.Message);
        Assert.Contains("runs past the end of the file (1000 bytes)", e.Message);
    }

    [Theory]
    // Megatron's arithmetic (shared/spec/megatron-formats.md §3 table).
    [InlineData("990,9,1", 1000, 0, 990, 990, 999, 999, 1000)]
    [InlineData("990,9,1", 1001, 0, 991, 991, 1000, 1000, 1001)]
    [InlineData("990,9,1", 12345, 0, 12222, 12222, 12333, 12333, 12345)]
    [InlineData("990,9,1", 150, 0, 148, 148, 150, 150, 150)]
    [InlineData("990,9,1", 100, 0, 99, 99, 100, 100, 100)]
    [InlineData("969, 30, 1", 1000, 0, 969, 969, 999, 999, 1000)]
    [InlineData("99990,8,2", 12345, 0, 12344, 12344, 12345, 12345, 12345)]
    public void Split_FollowsMegatronsBookEndsAndRounding(string split, long n, long a0, long a1, long b0, long b1, long c0, long c1)
    {
        var r = DataSplits.Ranges(split, n);
        Assert.Equal((a0, a1), r[0]);
        Assert.Equal((b0, b1), r[1]);
        Assert.Equal((c0, c1), r[2]);
    }

    [Fact]
    public void Split_WithZeroTestWeight_HasNoTestSplit()
    {
        var r = DataSplits.Ranges("98,2,0", 1000);
        Assert.Equal((0L, 980L), r[0]);
        Assert.Equal((980L, 1000L), r[1]);
        Assert.Null(r[2]);
    }
}
