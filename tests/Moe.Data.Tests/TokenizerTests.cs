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

    [Fact]
    public void TieBetweenEqualMerges_GoesToTheLeftmostPair()
    {
        // "  leading": sentencepiece gives ▁▁ | ▁l | e | a | ding (Microsoft.ML.Tokenizers gives ▁ | ▁▁ | le ...).
        var tok = Tokenizer.Load(TestPaths.Fixture("tokenizer-bpe-1k", "tokenizer.model"));
        var json = Tokenizer.Load(TestPaths.Fixture("tokenizer-bpe-1k", "tokenizer.json"));
        Assert.Equal(tok.Encode("  leading"), json.Encode("  leading"));
    }

    [Fact]
    public void NotATokenizer_IsANamedError()
    {
        string path = Path.GetTempFileName();
        File.WriteAllBytes(path, [0xff, 0xff, 0xff]);
        var e = Assert.Throws<Moe.Runtime.Commands.UserError>(() => Tokenizer.Load(path));
        Assert.Contains(path, e.Message);
        File.Delete(path);
    }
}
