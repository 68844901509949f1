using System.Text.Json;
using Moe.Runtime.Data;
using Moe.Tests;
using Xunit;

namespace Moe.Data.Tests;

public class TokenizerTests
{
    internal static string Bpe1k(string file) => TestPaths.Fixture("tokenizer-bpe-1k", file);

    internal static List<string> Docs() =>
        [.. File.ReadLines(Bpe1k("docs.jsonl")).Select(l => JsonDocument.Parse(l).RootElement.GetProperty("text").GetString()!)];

    internal static int[][] ExpectedIds()
    {
        using var doc = JsonDocument.Parse(File.ReadAllBytes(Bpe1k("expected_ids.json")));
        return [.. doc.RootElement.GetProperty("ids").EnumerateArray().Select(a => a.EnumerateArray().Select(e => e.GetInt32()).ToArray())];
    }

    private static void AssertAllDocuments(ITokenizer tokenizer)
    {
        var docs = Docs();
        var expected = ExpectedIds();
        Assert.Equal(306, docs.Count);
        Assert.Equal(docs.Count, expected.Length);
        var wrong = Enumerable.Range(0, docs.Count).Where(i => !tokenizer.Encode(docs[i]).SequenceEqual(expected[i])).ToList();
        Assert.True(wrong.Count == 0, $"{wrong.Count} documents differ from sentencepiece, first: {string.Join(", ", wrong.Take(10))}");
    }

    [Fact]
    public void SentencePieceModel_AllFixtureDocuments_MatchSentencepieceIds() =>
        AssertAllDocuments(SentencePieceBpeTokenizer.Load(Bpe1k("tokenizer.model")));

    [Fact]
    public void HuggingFaceJson_AllFixtureDocuments_MatchSentencepieceIds() =>
        AssertAllDocuments(HuggingFaceBpeTokenizer.Load(Bpe1k("tokenizer.json")));

    [Fact]
    public void SentencePieceModel_Options_ReadFromProtobuf()
    {
        var t = SentencePieceBpeTokenizer.Load(Bpe1k("tokenizer.model"));
        // Fixture README: vocab 1000, byte fallback, split digits, no extra-whitespace removal, dummy prefix, unk 0 bos 1 eos 2.
        Assert.Equal(1000, t.VocabSize);
        Assert.True(t.Model.ByteFallback);
        Assert.True(t.Model.SplitDigits);
        Assert.False(t.Model.RemoveExtraWhitespaces);
        Assert.True(t.Model.AddDummyPrefix);
        Assert.Equal((0, 1, 2), (t.Model.UnkId, t.BosId, t.EodId));
    }

    [Fact]
    public void BothTokenizers_SpecialIds_Agree()
    {
        var hf = HuggingFaceBpeTokenizer.Load(Bpe1k("tokenizer.json"));
        Assert.Equal((1000, 1, 2), (hf.VocabSize, hf.BosId, hf.EodId));
    }
}
