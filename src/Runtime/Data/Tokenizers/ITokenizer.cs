using Moe.Runtime.Commands;

namespace Moe.Runtime.Data.Tokenizers;

/// <summary>Text to token ids, as Megatron's preprocessing calls a tokenizer (no BOS, no EOS added).</summary>
public interface ITokenizer
{
    int VocabSize { get; }

    /// <summary>End-of-document id (the SentencePiece EOS).</summary>
    int EodId { get; }

    int BosId { get; }

    IReadOnlyList<int> Encode(string text);
}

/// <summary>Opens a tokenizer file by its kind: SentencePiece tokenizer.model or Hugging Face tokenizer.json.</summary>
public static class Tokenizer
{
    public static ITokenizer Load(string path)
    {
        if (!File.Exists(path)) throw new UserError($"{path}: no such tokenizer file (expected a SentencePiece tokenizer.model or a Hugging Face tokenizer.json).");
        return path.EndsWith(".json", StringComparison.OrdinalIgnoreCase)
            ? HuggingFaceBpeTokenizer.Load(path)
            : SentencePieceBpeTokenizer.Load(path);
    }
}

/// <summary>
/// The byte-pair merge loop both formats share: start from one symbol per character, repeatedly merge the
/// adjacent pair with the best priority (ties: the leftmost pair), then map symbols to ids, spelling a
/// symbol that is not in the vocabulary as its UTF-8 bytes (&lt;0xNN&gt; pieces) when byte fallback is on.
/// </summary>
internal static class BpeMerge
{
    /// <param name="symbols">Initial symbols (one per character).</param>
    /// <param name="priority">Priority of merging left and right into one symbol (higher first), or null when they do not merge.</param>
    public static List<string> Merge(List<string> symbols, Func<string, string, double?> priority)
    {
        int n = symbols.Count;
        if (n < 2) return symbols;
        var text = symbols.ToArray();
        var prev = new int[n];
        var next = new int[n];
        for (int i = 0; i < n; i++)
        {
            prev[i] = i - 1;
            next[i] = i + 1 < n ? i + 1 : -1;
        }
        // Max-priority first; among equal priorities the leftmost pair (smaller left index).
        var queue = new PriorityQueue<(int Left, int Right, string Merged), (double, int)>(
            Comparer<(double Priority, int Left)>.Create((a, b) => a.Priority != b.Priority ? b.Priority.CompareTo(a.Priority) : a.Left.CompareTo(b.Left)));
        void Offer(int left)
        {
            if (left < 0) return;
            int right = next[left];
            if (right < 0) return;
            if (priority(text[left], text[right]) is double p) queue.Enqueue((left, right, text[left] + text[right]), (p, left));
        }
        for (int i = 0; i + 1 < n; i++) Offer(i);
        while (queue.TryDequeue(out var pair, out _))
        {
            // Skip stale pairs: a side was merged away or changed since the pair was offered.
            if (text[pair.Left] is null || text[pair.Right] is null || next[pair.Left] != pair.Right || text[pair.Left] + text[pair.Right] != pair.Merged) continue;
            text[pair.Left] = pair.Merged;
            text[pair.Right] = null!;
            next[pair.Left] = next[pair.Right];
            if (next[pair.Right] >= 0) prev[next[pair.Right]] = pair.Left;
            Offer(prev[pair.Left]);
            Offer(pair.Left);
        }
        var result = new List<string>();
        for (int i = 0; i >= 0; i = next[i]) result.Add(text[i]);
        return result;
    }

    /// <summary>One symbol per Unicode character (surrogate pairs kept together).</summary>
    public static List<string> Characters(string s)
    {
        var list = new List<string>(s.Length);
        for (int i = 0; i < s.Length; i++)
        {
            if (char.IsHighSurrogate(s[i]) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1]))
            {
                list.Add(s.Substring(i, 2));
                i++;
            }
            else list.Add(s[i].ToString());
        }
        return list;
    }

    /// <summary>Ids of the final symbols; unknown ones become &lt;0xNN&gt; byte pieces (byte fallback) or the unknown id.</summary>
    public static List<int> ToIds(List<string> symbols, IReadOnlyDictionary<string, int> vocab, bool byteFallback, int unkId)
    {
        var ids = new List<int>(symbols.Count);
        foreach (var s in symbols)
        {
            if (vocab.TryGetValue(s, out int id))
            {
                ids.Add(id);
                continue;
            }
            if (byteFallback)
            {
                foreach (byte b in System.Text.Encoding.UTF8.GetBytes(s))
                {
                    if (!vocab.TryGetValue($"<0x{b:X2}>", out int bid))
                        throw new UserError($"the tokenizer has byte fallback on but no piece <0x{b:X2}>.");
                    ids.Add(bid);
                }
            }
            else ids.Add(unkId);
        }
        return ids;
    }
}
