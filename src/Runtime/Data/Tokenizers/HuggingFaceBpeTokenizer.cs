using System.Text.Json;
using Moe.Runtime.Commands;

namespace Moe.Runtime.Data.Tokenizers;

/// <summary>
/// A Hugging Face tokenizer.json with a BPE model as transformers' Llama/Mistral converter writes it:
/// normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, merges applied by rank (lowest first,
/// leftmost among equals), byte fallback. The ids equal sentencepiece's for the same tokenizer. Special
/// tokens are not added (Megatron's preprocessing would add BOS through transformers; Moe writes the ids
/// sentencepiece gives, so both tokenizer files produce the same .bin/.idx).
/// </summary>
public sealed class HuggingFaceBpeTokenizer : ITokenizer
{
    private readonly Dictionary<string, int> _vocab = new(StringComparer.Ordinal);
    private readonly Dictionary<(string, string), int> _ranks = new();
    private readonly List<Func<string, string>> _normalizers = new();
    private bool _byteFallback;
    private int _unkId, _bosId = 1, _eosId = 2;

    public int VocabSize => _vocab.Count;
    public int EodId => _eosId;
    public int BosId => _bosId;

    public static HuggingFaceBpeTokenizer Load(string path)
    {
        var t = new HuggingFaceBpeTokenizer();
        using (var doc = JsonFile.Parse(path))
        {
            var root = doc.RootElement;
            if (!root.TryGetProperty("model", out var model) || model.GetProperty("type").GetString() != "BPE")
                throw new UserError($"{path}: Moe reads tokenizer.json files whose model is BPE.");
            if (root.TryGetProperty("pre_tokenizer", out var pre) && pre.ValueKind != JsonValueKind.Null)
                throw new UserError($"{path}: a pre_tokenizer is set; Moe reads the SentencePiece-style (Llama/Mistral) tokenizer.json, which has none.");
            foreach (var p in model.GetProperty("vocab").EnumerateObject()) t._vocab[p.Name] = p.Value.GetInt32();
            int rank = 0;
            foreach (var m in model.GetProperty("merges").EnumerateArray())
            {
                var (a, b) = m.ValueKind == JsonValueKind.Array
                    ? (m[0].GetString()!, m[1].GetString()!)
                    : Split(m.GetString()!, path);
                t._ranks.TryAdd((a, b), rank++);
            }
            t._byteFallback = model.TryGetProperty("byte_fallback", out var bf) && bf.ValueKind == JsonValueKind.True;
            if (model.TryGetProperty("unk_token", out var unk) && unk.GetString() is string u && t._vocab.TryGetValue(u, out int uid)) t._unkId = uid;
            if (t._vocab.TryGetValue("<s>", out int bos)) t._bosId = bos;
            if (t._vocab.TryGetValue("</s>", out int eos)) t._eosId = eos;
            if (root.TryGetProperty("normalizer", out var normalizer) && normalizer.ValueKind != JsonValueKind.Null)
                t.AddNormalizer(normalizer, path);
        }
        return t;
    }

    private static (string, string) Split(string merge, string path)
    {
        int space = merge.IndexOf(' ');
        if (space <= 0) throw new UserError($"{path}: merge \"{merge}\" is not two pieces separated by a space.");
        return (merge[..space], merge[(space + 1)..]);
    }

    private void AddNormalizer(JsonElement n, string path)
    {
        switch (n.GetProperty("type").GetString())
        {
            case "Sequence":
                foreach (var inner in n.GetProperty("normalizers").EnumerateArray()) AddNormalizer(inner, path);
                break;
            case "Prepend":
                string prefix = n.GetProperty("prepend").GetString()!;
                _normalizers.Add(s => prefix + s);
                break;
            case "Replace":
                string from = n.GetProperty("pattern").GetProperty("String").GetString()!;
                string to = n.GetProperty("content").GetString()!;
                _normalizers.Add(s => s.Replace(from, to, StringComparison.Ordinal));
                break;
            default:
                throw new UserError($"{path}: normalizer {n.GetProperty("type").GetString()} is not supported (Prepend, Replace and Sequence are).");
        }
    }

    public IReadOnlyList<int> Encode(string text)
    {
        if (text.Length == 0) return Array.Empty<int>();
        foreach (var normalize in _normalizers) text = normalize(text);
        var merged = BpeMerge.Merge(BpeMerge.Characters(text),
            (a, b) => _ranks.TryGetValue((a, b), out int rank) ? -rank : null);
        return BpeMerge.ToIds(merged, _vocab, _byteFallback, _unkId);
    }
}
