using System.Text;
using System.Text.Json;

namespace Moe.Runtime.Data;

/// <summary>
/// Reads a Hugging Face <c>tokenizer.json</c> whose model is BPE (the Llama/Mistral shape written by
/// transformers' converter) and encodes as the Rust tokenizers library does, without the post-processor:
/// split the text on added tokens; normalise each other segment (supported normalisers: Prepend, Replace
/// with a string pattern, Sequence; pre-tokenizer: none or Metaspace without splitting); split into code
/// points, each code point missing from the vocabulary becoming its <c>&lt;0xNN&gt;</c> byte tokens
/// (byte_fallback) or unk; then apply merges lowest rank first, ties leftmost (<c>models/bpe/word.rs</c>).
/// <para>
/// No BOS is added: Megatron's <c>HuggingFaceTokenizer</c> would prepend <c>&lt;s&gt;</c> (the template
/// post-processor), but <c>moe preprocess</c> writes the ids sentencepiece's <c>encode_as_ids</c> gives,
/// so a tokenizer.json and its tokenizer.model produce the same .bin/.idx. See docs/data.md.
/// </para>
/// </summary>
public sealed class HuggingFaceBpeTokenizer : ITokenizer
{
    private readonly Dictionary<string, int> _vocab;
    private readonly Dictionary<(int, int), (int Rank, int Id)> _merges;
    private readonly List<(string Content, int Id)> _added;
    private readonly List<Func<string, string>> _normalizers;
    private readonly bool _byteFallback;
    private readonly bool _fuseUnk;
    private readonly bool _ignoreMerges;
    private readonly int _unkId;
    private readonly int[] _byteIds = new int[256];

    private HuggingFaceBpeTokenizer(Dictionary<string, int> vocab, Dictionary<(int, int), (int, int)> merges,
        List<(string, int)> added, List<Func<string, string>> normalizers, bool byteFallback, bool fuseUnk, bool ignoreMerges, int unkId, int eod, int bos)
    {
        _vocab = vocab; _merges = merges; _added = added; _normalizers = normalizers;
        _byteFallback = byteFallback; _fuseUnk = fuseUnk; _ignoreMerges = ignoreMerges; _unkId = unkId;
        EodId = eod; BosId = bos;
        for (int b = 0; b < 256; b++) _byteIds[b] = vocab.TryGetValue($"<0x{b:X2}>", out int id) ? id : -1;
        int max = vocab.Count == 0 ? 0 : vocab.Values.Max() + 1;
        foreach (var (_, id) in added) max = Math.Max(max, id + 1);
        VocabSize = max;
    }

    public int VocabSize { get; }
    public int EodId { get; }
    public int BosId { get; }

    public static HuggingFaceBpeTokenizer Load(string path)
    {
        using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
        var root = doc.RootElement;
        var model = root.GetProperty("model");
        string type = model.TryGetProperty("type", out var t) ? t.GetString() ?? "" : "";
        if (type != "BPE") throw new InvalidDataException($"{path}: model type '{type}' is not supported; only BPE tokenizer.json files (Llama/Mistral shape) are.");
        foreach (var unsupported in new[] { "continuing_subword_prefix", "end_of_word_suffix" })
            if (model.TryGetProperty(unsupported, out var v) && v.ValueKind != JsonValueKind.Null)
                throw new InvalidDataException($"{path}: model.{unsupported} is set; it is not supported.");
        if (model.TryGetProperty("dropout", out var drop) && drop.ValueKind == JsonValueKind.Number && drop.GetDouble() > 0)
            throw new InvalidDataException($"{path}: BPE dropout is set; preprocessing must be deterministic.");

        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var p in model.GetProperty("vocab").EnumerateObject()) vocab[p.Name] = p.Value.GetInt32();

        var merges = new Dictionary<(int, int), (int, int)>();
        int rank = 0;
        foreach (var m in model.GetProperty("merges").EnumerateArray())
        {
            string a, b;
            if (m.ValueKind == JsonValueKind.Array) { a = m[0].GetString()!; b = m[1].GetString()!; }
            else
            {
                var s = m.GetString()!;
                int sp = s.IndexOf(' ');
                if (sp < 0) throw new InvalidDataException($"{path}: merge '{s}' is not 'left right'.");
                a = s[..sp]; b = s[(sp + 1)..];
            }
            if (!vocab.TryGetValue(a, out int ia) || !vocab.TryGetValue(b, out int ib) || !vocab.TryGetValue(a + b, out int iab))
                throw new InvalidDataException($"{path}: merge {rank} ('{a}', '{b}') refers to a token missing from the vocabulary.");
            merges.TryAdd((ia, ib), (rank, iab));
            rank++;
        }

        var added = new List<(string, int)>();
        if (root.TryGetProperty("added_tokens", out var at) && at.ValueKind == JsonValueKind.Array)
            foreach (var a in at.EnumerateArray()) added.Add((a.GetProperty("content").GetString()!, a.GetProperty("id").GetInt32()));
        added.Sort((x, y) => y.Item1.Length.CompareTo(x.Item1.Length));

        var normalizers = new List<Func<string, string>>();
        if (root.TryGetProperty("normalizer", out var norm)) AddNormalizer(path, norm, normalizers);
        if (root.TryGetProperty("pre_tokenizer", out var pre) && pre.ValueKind != JsonValueKind.Null)
        {
            string pt = pre.GetProperty("type").GetString() ?? "";
            bool split = pre.TryGetProperty("split", out var sp) && sp.ValueKind == JsonValueKind.True;
            if (pt != "Metaspace" || split)
                throw new InvalidDataException($"{path}: pre_tokenizer '{pt}'{(split ? " with split" : "")} is not supported (only none, or Metaspace without splitting).");
            string rep = pre.TryGetProperty("replacement", out var r) ? r.GetString()! : "\u2581";
            string scheme = pre.TryGetProperty("prepend_scheme", out var ps) ? ps.GetString()! : "always";
            bool prepend = scheme != "never";
            normalizers.Add(s => { var x = s.Replace(" ", rep); return prepend && !x.StartsWith(rep, StringComparison.Ordinal) ? rep + x : x; });
        }

        int unk = model.TryGetProperty("unk_token", out var u) && u.ValueKind == JsonValueKind.String && vocab.TryGetValue(u.GetString()!, out int uid) ? uid : -1;
        int Special(string s) => vocab.TryGetValue(s, out int id) ? id : added.Where(a => a.Item1 == s).Select(a => a.Item2).DefaultIfEmpty(-1).First();
        int eod = Special("</s>");
        if (eod < 0) throw new InvalidDataException($"{path}: no '</s>' token to use as end of document.");
        return new HuggingFaceBpeTokenizer(vocab, merges, added, normalizers,
            model.TryGetProperty("byte_fallback", out var bf) && bf.ValueKind == JsonValueKind.True,
            model.TryGetProperty("fuse_unk", out var fu) && fu.ValueKind == JsonValueKind.True,
            model.TryGetProperty("ignore_merges", out var im) && im.ValueKind == JsonValueKind.True,
            unk, eod, Special("<s>"));
    }

    private static void AddNormalizer(string path, JsonElement n, List<Func<string, string>> into)
    {
        if (n.ValueKind == JsonValueKind.Null) return;
        string type = n.GetProperty("type").GetString() ?? "";
        switch (type)
        {
            case "Sequence":
                foreach (var c in n.GetProperty("normalizers").EnumerateArray()) AddNormalizer(path, c, into);
                break;
            case "Prepend":
                string pre = n.GetProperty("prepend").GetString()!;
                into.Add(s => s.Length == 0 ? s : pre + s);
                break;
            case "Replace":
                if (!n.GetProperty("pattern").TryGetProperty("String", out var pat))
                    throw new InvalidDataException($"{path}: Replace normaliser with a regex pattern is not supported.");
                string from = pat.GetString()!, to = n.GetProperty("content").GetString()!;
                into.Add(s => s.Replace(from, to, StringComparison.Ordinal));
                break;
            default:
                throw new InvalidDataException($"{path}: normaliser '{type}' is not supported (Prepend, Replace and Sequence are).");
        }
    }

    public int[] Encode(string text)
    {
        var ids = new List<int>();
        int start = 0;
        while (start <= text.Length)
        {
            // Find the next added token (longest at the earliest position).
            int best = -1, bestId = -1, bestLen = 0;
            foreach (var (content, id) in _added)
            {
                if (content.Length == 0) continue;
                int at = text.IndexOf(content, start, StringComparison.Ordinal);
                if (at >= 0 && (best < 0 || at < best || (at == best && content.Length > bestLen))) { best = at; bestId = id; bestLen = content.Length; }
            }
            int end = best < 0 ? text.Length : best;
            if (end > start) EncodeSegment(text[start..end], ids);
            if (best < 0) break;
            ids.Add(bestId);
            start = best + bestLen;
        }
        return [.. ids];
    }

    private void EncodeSegment(string segment, List<int> ids)
    {
        foreach (var n in _normalizers) segment = n(segment);
        if (segment.Length == 0) return;
        if (_ignoreMerges && _vocab.TryGetValue(segment, out int whole)) { ids.Add(whole); return; }

        var symbols = new BpeMerger.Symbol[segment.Length * 4];
        int count = 0;
        Span<byte> utf8 = stackalloc byte[4];
        for (int pos = 0; pos < segment.Length;)
        {
            int len = char.IsHighSurrogate(segment[pos]) && pos + 1 < segment.Length && char.IsLowSurrogate(segment[pos + 1]) ? 2 : 1;
            var ch = segment.AsSpan(pos, len);
            if (_vocab.GetAlternateLookup<ReadOnlySpan<char>>().TryGetValue(ch, out int id)) Add(id);
            else
            {
                int nb = Encoding.UTF8.GetBytes(ch, utf8);
                bool allBytes = _byteFallback;
                for (int b = 0; b < nb && allBytes; b++) allBytes = _byteIds[utf8[b]] >= 0;
                if (allBytes) for (int b = 0; b < nb; b++) Add(_byteIds[utf8[b]]);
                else if (_unkId < 0) throw new InvalidDataException($"Character U+{char.ConvertToUtf32(ch.ToString(), 0):X4} is not in the vocabulary and the tokenizer has no unk token.");
                else if (!(_fuseUnk && count > 0 && symbols[count - 1].Id == _unkId)) Add(_unkId);
            }
            pos += len;
        }

        var merges = _merges;
        BpeMerger.Merge(symbols, count, (ref BpeMerger.Symbol l, ref BpeMerger.Symbol r, out double priority, out int mergedId) =>
        {
            if (merges.TryGetValue((l.Id, r.Id), out var m)) { priority = m.Rank; mergedId = m.Id; return true; }
            priority = 0; mergedId = -1;
            return false;
        });
        for (int i = 0; i >= 0; i = symbols[i].Next) ids.Add(symbols[i].Id);

        void Add(int id)
        {
            symbols[count] = new BpeMerger.Symbol { Start = -1, Length = 1, Id = id, Prev = count - 1, Next = -1 };
            if (count > 0) symbols[count - 1].Next = count;
            count++;
        }
    }
}
