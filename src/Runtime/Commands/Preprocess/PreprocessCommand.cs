using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Moe.Runtime.Data;
using Moe.Runtime.Data.Tokenizers;

namespace Moe.Runtime.Commands.Preprocess;

/// <summary>
/// Megatron's preprocess_data.py in C#: each JSON line's keys are tokenized (no BOS/EOS added), EOD
/// appended with --append-eod, one sequence per document; a document with no token is a document boundary
/// with no sequence and no EOD, as Megatron-Core's own tool writes it (<c>Encoder.encode</c> appends EOD only
/// to a document with tokens, and <c>add_document</c> is called with no lengths), uint16 ids for vocabularies under 65,500 else int32. Lines are read in batches, tokenized by
/// --workers threads and written in input order. Outputs are temporary files renamed into place only when
/// every line is done, so a failed or interrupted run leaves no .bin/.idx pair that looks whole.
/// </summary>
public static class PreprocessCommand
{
    public sealed record Request(string Input, string Tokenizer, string OutputPrefix, string[] JsonKeys, bool AppendEod, bool Sft, int Workers, bool SkipBadLines);

    public sealed record Result(int Exit, long Documents, long Tokens, long Skipped);

    private sealed record Encoded(long Line, int[][]? Sequences, byte[]? LossMask, string? Error);

    public static Result Execute(Request r, TextWriter log)
    {
        if (!File.Exists(r.Input)) throw new UserError($"--input {r.Input}: no such file.");
        if (r.Workers < 1) throw new UserError($"--workers {r.Workers} must be at least 1.");
        var tokenizer = Tokenizer.Load(r.Tokenizer);
        string[] keys = r.Sft ? ["text"] : r.JsonKeys;
        var dtype = IndexedDataset.DtypeForVocabulary(tokenizer.VocabSize);
        var builders = keys.Select(k => new IndexedDatasetBuilder($"{r.OutputPrefix}_{k}_document", dtype)).ToList();
        var maskBuilder = r.Sft ? new IndexedDatasetBuilder($"{r.OutputPrefix}_lossmask_document", IndexedDtype.UInt8) : null;
        var watch = Stopwatch.StartNew();
        long documents = 0, tokens = 0, skipped = 0, lineNumber = 0, bytesDone = 0;
        long bytesTotal = Math.Max(1, new FileInfo(r.Input).Length);
        bool terminal = !Console.IsErrorRedirected;
        try
        {
            foreach (var batch in ReadBatches(r.Input, 4096))
            {
                var encoded = new Encoded[batch.Count];
                Parallel.For(0, batch.Count, new ParallelOptions { MaxDegreeOfParallelism = r.Workers },
                    i => encoded[i] = batch[i].Text is null
                        ? new Encoded(batch[i].Number, null, null, batch[i].Error)
                        : Encode(batch[i].Number, batch[i].Text!, keys, r, tokenizer));
                bytesDone += batch.Sum(l => (long)System.Text.Encoding.UTF8.GetByteCount(l.Text ?? "") + 1);
                foreach (var e in encoded)
                {
                    lineNumber = e.Line;
                    if (e.Error is not null)
                    {
                        if (!r.SkipBadLines)
                            throw new UserError($"{r.Input}:{e.Line}: {e.Error}. Nothing was written; fix the line or pass --on-error skip.");
                        skipped++;
                        log.WriteLine($"{r.Input}:{e.Line}: skipped: {e.Error}");
                        continue;
                    }
                    for (int k = 0; k < builders.Count; k++)
                    {
                        // An empty document is a document of zero sequences: a boundary, nothing in .bin.
                        if (e.Sequences![k].Length > 0) builders[k].AddSequence(e.Sequences[k]);
                        builders[k].EndDocument();
                        tokens += e.Sequences[k].Length;
                    }
                    if (maskBuilder is not null)
                    {
                        if (e.LossMask!.Length > 0) maskBuilder.AddBytes(e.LossMask);
                        maskBuilder.EndDocument();
                    }
                    documents++;
                }
                if (terminal) log.Write("\r" + Bar(Math.Min(1.0, bytesDone / (double)bytesTotal)) + " " + Progress(documents, tokens, watch.Elapsed.TotalSeconds) + "   ");
            }
            var all = maskBuilder is null ? builders : [.. builders, maskBuilder];
            foreach (var b in all) b.Complete();
            IndexedDatasetBuilder.Commit(all);
        }
        finally
        {
            foreach (var b in builders) b.Dispose();
            maskBuilder?.Dispose();
        }
        if (terminal) log.WriteLine();
        log.WriteLine(Progress(documents, tokens, watch.Elapsed.TotalSeconds) + (skipped > 0 ? $"; skipped {skipped} malformed line(s)" : ""));
        foreach (var k in keys) log.WriteLine($"wrote {r.OutputPrefix}_{k}_document.bin/.idx");
        if (maskBuilder is not null) log.WriteLine($"wrote {r.OutputPrefix}_lossmask_document.bin/.idx");
        return new Result(0, documents, tokens, skipped);
    }

    /// <summary>"[##########----------]  50%" for the share of the input read so far.</summary>
    public static string Bar(double fraction)
    {
        int filled = (int)Math.Round(fraction * 20);
        return "[" + new string('#', filled) + new string('-', 20 - filled) + "] " + ((int)Math.Round(fraction * 100)).ToString(CultureInfo.InvariantCulture).PadLeft(3) + "%";
    }

    private static string Progress(long documents, long tokens, double seconds) => string.Create(CultureInfo.InvariantCulture,
        $"{documents} documents, {tokens} tokens in {seconds:F1} s ({documents / Math.Max(seconds, 1e-9):F0} documents/s, {tokens / Math.Max(seconds, 1e-9):F0} tokens/s)");

    private static readonly System.Text.UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>
    /// Lines in batches, split on '\n' as bytes (a trailing '\r' and a leading BOM dropped) and decoded one
    /// by one as strict UTF-8, so invalid bytes are reported against their own line instead of being
    /// silently replaced with U+FFFD (Python's strict decoding in Megatron would stop there too).
    /// A line that is not UTF-8 comes back with <c>Text</c> null and the reason in <c>Error</c>.
    /// </summary>
    private static IEnumerable<List<(long Number, string? Text, string? Error)>> ReadBatches(string path, int size)
    {
        var batch = new List<(long, string?, string?)>(size);
        long n = 0;
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
        var line = new MemoryStream();
        var buffer = new byte[1 << 20];
        int read;
        while (true)
        {
            read = stream.Read(buffer, 0, buffer.Length);
            int start = 0;
            for (int i; (i = buffer.AsSpan(start, read - start).IndexOf((byte)'\n')) >= 0;)
            {
                i += start;
                line.Write(buffer, start, i - start);
                start = i + 1;
                batch.Add(Decode(++n, line));
                line.SetLength(0);
                if (batch.Count == size)
                {
                    yield return batch;
                    batch = new List<(long, string?, string?)>(size);
                }
            }
            if (read == 0) break;
            line.Write(buffer, start, read - start);
        }
        if (line.Length > 0) batch.Add(Decode(++n, line));
        if (batch.Count > 0) yield return batch;
    }

    private static (long, string?, string?) Decode(long number, MemoryStream line)
    {
        var bytes = line.GetBuffer().AsSpan(0, (int)line.Length);
        if (number == 1 && bytes.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF])) bytes = bytes[3..];
        if (bytes.Length > 0 && bytes[^1] == (byte)'\r') bytes = bytes[..^1];
        try
        {
            return (number, StrictUtf8.GetString(bytes), null);
        }
        catch (System.Text.DecoderFallbackException e)
        {
            return (number, null, $"not valid UTF-8 (byte 0x{e.BytesUnknown?.FirstOrDefault():X2} at byte offset {e.Index} of the line)");
        }
    }

    private static Encoded Encode(long line, string text, string[] keys, Request r, ITokenizer tokenizer)
    {
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(text);
        }
        catch (JsonException e)
        {
            return new Encoded(line, null, null, $"not valid JSON ({e.Message})");
        }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object) return new Encoded(line, null, null, "a line must be a JSON object");
            string? Field(string key, out string? error)
            {
                error = null;
                if (!doc.RootElement.TryGetProperty(key, out var v)) { error = $"no \"{key}\" field"; return null; }
                if (v.ValueKind != JsonValueKind.String) { error = $"\"{key}\" is {v.ValueKind}, not a string"; return null; }
                return v.GetString();
            }
            if (r.Sft)
            {
                string? prompt = Field("input", out var e1);
                if (e1 is not null) return new Encoded(line, null, null, e1 + " (SFT records have \"input\" and \"output\")");
                string? answer = Field("output", out var e2);
                if (e2 is not null) return new Encoded(line, null, null, e2 + " (SFT records have \"input\" and \"output\")");
                var p = tokenizer.Encode(prompt!);
                // Prompt and answer are encoded separately, so no merge crosses the boundary the loss mask marks.
                var a = tokenizer.Encode(answer!);
                // A record with no token at all is an empty document, as in the plain path: no EOD.
                if (p.Count + a.Count == 0) return new Encoded(line, [[]], [], null);
                var ids = p.Concat(a).Append(tokenizer.EodId).ToArray();
                var mask = Enumerable.Repeat((byte)0, p.Count).Concat(Enumerable.Repeat((byte)1, a.Count + 1)).ToArray();
                return new Encoded(line, [ids], mask, null);
            }
            var sequences = new int[keys.Length][];
            for (int k = 0; k < keys.Length; k++)
            {
                string? value = Field(keys[k], out var error);
                if (error is not null) return new Encoded(line, null, null, error);
                var ids = tokenizer.Encode(value!);
                sequences[k] = r.AppendEod && ids.Count > 0 ? ids.Append(tokenizer.EodId).ToArray() : ids.ToArray();
            }
            return new Encoded(line, sequences, null, null);
        }
    }
}
