using Moe.Runtime.Commands;
using Moe.Runtime.Commands.Preprocess;
using Moe.Runtime.Data;
using Moe.Tests;
using Xunit;

namespace Moe.Data.Tests;

/// <summary>`moe preprocess` against Megatron-Core's own output for the tokenizer fixture.</summary>
[Collection("Console")]
public class PreprocessTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-pre-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static string F(string name) => TestPaths.Fixture("tokenizer-bpe-1k", name);

    private static (int Exit, string Err) Run(params string[] args)
    {
        var (exit, _, err) = ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(), args));
        return (exit, err);
    }

    [Theory]
    [InlineData("tokenizer.model", "1", true)]
    [InlineData("tokenizer.json", "1", true)]
    [InlineData("tokenizer.model", "4", true)]
    [InlineData("tokenizer.json", "4", true)]
    [InlineData("tokenizer.model", "1", false)]
    [InlineData("tokenizer.json", "1", false)]
    [InlineData("tokenizer.model", "4", false)]
    [InlineData("tokenizer.json", "4", false)]
    public void Preprocess_ReproducesMegatronsBinAndIdxByteForByte(string tokenizer, string workers, bool appendEod)
    {
        string prefix = Path.Combine(_dir, "out");
        string[] args = ["preprocess", "--input", F("docs.jsonl"), "--tokenizer", F(tokenizer), "--output-prefix", prefix, "--workers", workers];
        var (exit, err) = Run(appendEod ? [.. args, "--append-eod"] : args);
        Assert.True(exit == 0, err);
        Assert.Contains("306 documents", err);
        string fixture = appendEod ? "megatron_text_document" : "megatron_noeod_text_document";
        Assert.Equal(File.ReadAllBytes(F(fixture + ".idx")), File.ReadAllBytes(prefix + "_text_document.idx"));
        Assert.Equal(File.ReadAllBytes(F(fixture + ".bin")), File.ReadAllBytes(prefix + "_text_document.bin"));
    }

    [Fact]
    public void EmptySftRecord_IsADocumentWithNoSequenceInBothDatasets()
    {
        // As an empty text document: a boundary, no EOD, and the loss-mask dataset stays aligned with the text.
        string input = WriteLines("{\"input\": \"Hi\", \"output\": \"there\"}", "{\"input\": \"\", \"output\": \"\"}", "{\"input\": \"a\", \"output\": \"b\"}");
        string prefix = Path.Combine(_dir, "sftempty");
        var (exit, err) = Run("preprocess", "--input", input, "--tokenizer", F("tokenizer.model"), "--output-prefix", prefix, "--sft");
        Assert.True(exit == 0, err);
        using var text = IndexedDataset.Open(prefix + "_text_document");
        using var mask = IndexedDataset.Open(prefix + "_lossmask_document");
        Assert.Equal(new long[] { 0, 1, 1, 2 }, text.DocumentIndices);
        Assert.Equal(new long[] { 0, 1, 1, 2 }, mask.DocumentIndices);
        Assert.Equal(2, text.SequenceCount);
        Assert.Equal(text.Lengths, mask.Lengths);
    }

    private string WriteLines(params string[] lines)
    {
        string path = Path.Combine(_dir, "in.jsonl");
        File.WriteAllLines(path, lines);
        return path;
    }

    [Fact]
    public void MalformedLine_NamesTheLineAndLeavesNoOutput()
    {
        string input = WriteLines("{\"text\": \"fine\"}", "{\"text\": \"also fine\"}", "{\"text\": 42}", "not json");
        string prefix = Path.Combine(_dir, "bad");
        var (exit, err) = Run("preprocess", "--input", input, "--tokenizer", F("tokenizer.model"), "--output-prefix", prefix);
        Assert.Equal(2, exit);
        Assert.Contains("in.jsonl:3: \"text\" is Number, not a string", err);
        Assert.Empty(Directory.GetFiles(_dir, "bad*"));
    }

    [Fact]
    public void SkipMode_SkipsCountsAndReportsBadLines()
    {
        string input = WriteLines("{\"text\": \"fine\"}", "{\"txt\": \"wrong key\"}", "{broken", "{\"text\": \"end\"}");
        string prefix = Path.Combine(_dir, "skip");
        var (exit, err) = Run("preprocess", "--input", input, "--tokenizer", F("tokenizer.model"), "--output-prefix", prefix, "--on-error", "skip", "--append-eod");
        Assert.Equal(0, exit);
        Assert.Contains("in.jsonl:2: skipped: no \"text\" field", err);
        Assert.Contains("in.jsonl:3: skipped: not valid JSON", err);
        Assert.Contains("2 documents", err);
        Assert.Contains("skipped 2 malformed line(s)", err);
        using var ds = IndexedDataset.Open(prefix + "_text_document");
        Assert.Equal(2, ds.SequenceCount);
    }

    [Fact]
    public void InvalidUtf8_NamesItsLineAndIsSkippable()
    {
        string input = Path.Combine(_dir, "in.jsonl");
        File.WriteAllBytes(input, [.. "{\"text\": \"ok\"}\n{\"text\": \"caf"u8, 0xE9, .. "\"}\n{\"text\": \"end\"}"u8]);
        string prefix = Path.Combine(_dir, "utf");
        var (exit, err) = Run("preprocess", "--input", input, "--tokenizer", F("tokenizer.model"), "--output-prefix", prefix);
        Assert.Equal(2, exit);
        Assert.Contains("in.jsonl:2: not valid UTF-8", err);
        Assert.Empty(Directory.GetFiles(_dir, "utf*"));

        (exit, err) = Run("preprocess", "--input", input, "--tokenizer", F("tokenizer.model"), "--output-prefix", prefix, "--on-error", "skip");
        Assert.True(exit == 0, err);
        Assert.Contains("skipped 1 malformed line(s)", err);
        using var ds = IndexedDataset.Open(prefix + "_text_document");
        Assert.Equal(2, ds.SequenceCount);
    }

    [Fact]
    public void CrLfLineEndingsAndLastLineWithoutNewline_GiveMegatronsFiles()
    {
        // JSON ignores the '\r' of "\r\n"; Python's line iteration (universal newlines) drops it too.
        string input = Path.Combine(_dir, "crlf.jsonl");
        File.WriteAllText(input, string.Join("\r\n", File.ReadAllLines(F("docs.jsonl"))));
        string prefix = Path.Combine(_dir, "crlf");
        var (exit, err) = Run("preprocess", "--input", input, "--tokenizer", F("tokenizer.model"), "--output-prefix", prefix, "--append-eod");
        Assert.True(exit == 0, err);
        Assert.Equal(File.ReadAllBytes(F("megatron_text_document.idx")), File.ReadAllBytes(prefix + "_text_document.idx"));
        Assert.Equal(File.ReadAllBytes(F("megatron_text_document.bin")), File.ReadAllBytes(prefix + "_text_document.bin"));
    }

    [Fact]
    public void RerunOverEarlierOutput_ReplacesItAndLeavesNoTemporaryFiles()
    {
        string prefix = Path.Combine(_dir, "again");
        var (exit, err) = Run("preprocess", "--input", WriteLines("{\"text\": \"short\"}"), "--tokenizer", F("tokenizer.json"), "--output-prefix", prefix);
        Assert.True(exit == 0, err);
        (exit, err) = Run("preprocess", "--input", F("docs.jsonl"), "--tokenizer", F("tokenizer.json"), "--output-prefix", prefix, "--append-eod", "--workers", "2");
        Assert.True(exit == 0, err);
        Assert.Equal(["again_text_document.bin", "again_text_document.idx"], Directory.GetFiles(_dir, "again*").Select(Path.GetFileName).Order(StringComparer.Ordinal));
        Assert.Equal(File.ReadAllBytes(F("megatron_text_document.bin")), File.ReadAllBytes(prefix + "_text_document.bin"));
        Assert.Equal(File.ReadAllBytes(F("megatron_text_document.idx")), File.ReadAllBytes(prefix + "_text_document.idx"));
    }

    [Fact]
    public void SftRecords_MaskThePromptOutOfTheLoss()
    {
        string input = WriteLines("{\"input\": \"What is MoE?\", \"output\": \"Mixture of experts.\"}");
        string prefix = Path.Combine(_dir, "sft");
        var (exit, err) = Run("preprocess", "--input", input, "--tokenizer", F("tokenizer.model"), "--output-prefix", prefix, "--sft");
        Assert.True(exit == 0, err);
        var tok = Moe.Runtime.Data.Tokenizers.Tokenizer.Load(F("tokenizer.model"));
        int promptLength = tok.Encode("What is MoE?").Count, answerLength = tok.Encode("Mixture of experts.").Count;
        using var text = IndexedDataset.Open(prefix + "_text_document");
        using var mask = IndexedDataset.Open(prefix + "_lossmask_document");
        Assert.Equal(promptLength + answerLength + 1, text.Lengths[0]);
        Assert.Equal(Enumerable.Repeat(0L, promptLength).Concat(Enumerable.Repeat(1L, answerLength + 1)), mask.Read(0));
        Assert.Equal(2L, text.Read(0)[^1]);

        // A sample over this record counts only positions whose target is an answer token or the EOD.
        int s = promptLength + answerLength;
        var ds = new GptDataset(text, (0, 1), 1, new SampleOptions(s, 2, false, false, false), seed: 1, lossMask: mask);
        var sample = ds.Sample(0);
        Assert.Equal(Enumerable.Repeat(0f, promptLength - 1).Concat(Enumerable.Repeat(1f, answerLength + 1)), sample.LossMask);
    }
}

public class ProgressBarTests
{
    [Theory]
    [InlineData(0.0, "[--------------------]   0%")]
    [InlineData(0.5, "[##########----------]  50%")]
    [InlineData(1.0, "[####################] 100%")]
    public void Bar_ShowsTheShareOfTheInputRead(double fraction, string expected)
    {
        Assert.Equal(expected, PreprocessCommand.Bar(fraction));
    }
}
