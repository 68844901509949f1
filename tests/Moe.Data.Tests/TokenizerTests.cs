using Moe.Runtime;
using System.Text.Json;
using Moe.Runtime.Data.Tokenizers;
using Moe.Tests;
using Xunit;

namespace Moe.Data.Tests;

/// <summary>Our encoders against sentencepiece's ids on all 306 fixture documents.</summary>
public class TokenizerTests
{
    private static (string[] Docs, int[][] Ids) Fixture()
    {
        var docs = File.ReadAllLines(TestPaths.Fixture("tokenizer-bpe-1k", "docs.jsonl"))
            .Select(l => JsonDocument.Parse(l).RootElement.GetProperty("text").GetString()!).ToArray();
        using var doc = JsonDocument.Parse(File.ReadAllText(TestPaths.Fixture("tokenizer-bpe-1k", "expected_ids.json")));
        var ids = doc.RootElement.GetProperty("ids").EnumerateArray().Select(d => d.EnumerateArray().Select(e => e.GetInt32()).ToArray()).ToArray();
        return (docs, ids);
    }

    [Theory]
    [InlineData("tokenizer.model")]
    [InlineData("tokenizer.json")]
    public void EveryFixtureDocument_EncodesToSentencepiecesIds(string file)
    {
        var tok = Tokenizer.Load(TestPaths.Fixture("tokenizer-bpe-1k", file));
        var (docs, ids) = Fixture();
        Assert.Equal(306, docs.Length);
        var wrong = Enumerable.Range(0, docs.Length).Where(i => !tok.Encode(docs[i]).SequenceEqual(ids[i])).ToArray();
        Assert.True(wrong.Length == 0, $"{wrong.Length} documents differ, first {string.Join(", ", wrong.Take(5))}: " +
            (wrong.Length > 0 ? $"ours [{string.Join(",", tok.Encode(docs[wrong[0]]))}] vs [{string.Join(",", ids[wrong[0]])}]" : ""));
        Assert.Equal(2, tok.EodId);
        Assert.Equal(1000, tok.VocabSize);
    }

    [Theory]
    // shared/spec/tokenizer-notes.md: sentencepiece's pieces where equal-scoring merges tie (leftmost wins);
    // Microsoft.ML.Tokenizers gets both wrong.
    [InlineData("tokenizer.model", "  leading", new[] { "\u2581\u2581", "\u2581l", "e", "a", "ding" })]
    [InlineData("tokenizer.json", "  leading", new[] { "\u2581\u2581", "\u2581l", "e", "a", "ding" })]
    [InlineData("tokenizer.model", "### Dataset", new[] { "\u2581###", "\u2581D", "ata", "se", "t" })]
    [InlineData("tokenizer.json", "### Dataset", new[] { "\u2581###", "\u2581D", "ata", "se", "t" })]
    public void TieBetweenEqualMerges_GoesToTheLeftmostPair(string file, string text, string[] pieces)
    {
        // Piece ids come from the fixture's tokenizer.json vocabulary, read here independently of our encoders.
        using var json = JsonDocument.Parse(File.ReadAllText(TestPaths.Fixture("tokenizer-bpe-1k", "tokenizer.json")));
        var vocab = json.RootElement.GetProperty("model").GetProperty("vocab");
        var expected = pieces.Select(p => vocab.GetProperty(p).GetInt32()).ToArray();
        var tok = Tokenizer.Load(TestPaths.Fixture("tokenizer-bpe-1k", file));
        Assert.Equal(expected, tok.Encode(text));
    }

    [Fact]
    public void NotATokenizer_IsANamedError()
    {
        string path = Path.GetTempFileName();
        File.WriteAllBytes(path, [0xff, 0xff, 0xff]);
        var e = Assert.Throws<Moe.Runtime.UserError>(() => Tokenizer.Load(path));
        Assert.Contains(path, e.Message);
        File.Delete(path);
    }
}
