namespace Moe.Runtime.Data;

/// <summary>
/// The byte-pair merge loop shared by both tokenizers: symbols form a linked list over the input; a
/// priority queue holds candidate adjacent pairs ordered by (priority, left position) — lowest first —
/// and stale entries are skipped when popped. SentencePiece passes <c>-score</c> as the priority (highest
/// score first, ties leftmost: <c>bpe_model.cc</c>); Hugging Face passes the merge rank (lowest rank first,
/// ties leftmost: <c>tokenizers/src/models/bpe/word.rs</c>).
/// </summary>
internal static class BpeMerger
{
    internal struct Symbol
    {
        public int Start;   // offset in the text (chars) or -1 for a synthetic symbol
        public int Length;  // 0 once merged into its left neighbour
        public int Id;      // vocabulary id, or -1 when unknown
        public int Prev;
        public int Next;
    }

    /// <summary>Looks up the merge of two adjacent symbols; false when they do not merge.</summary>
    internal delegate bool PairLookup(ref Symbol left, ref Symbol right, out double priority, out int mergedId);

    private readonly struct Candidate(int left, int right, int size)
    {
        public readonly int Left = left, Right = right, Size = size;
    }

    private sealed class CandidateOrder : IComparer<(double Priority, int Left)>
    {
        public static readonly CandidateOrder Instance = new();
        public int Compare((double Priority, int Left) a, (double Priority, int Left) b)
        {
            int c = a.Priority.CompareTo(b.Priority);
            return c != 0 ? c : a.Left.CompareTo(b.Left);
        }
    }

    /// <summary>Merges <paramref name="symbols"/> in place; the survivors are those with Length &gt; 0.</summary>
    internal static void Merge(Symbol[] symbols, int count, PairLookup lookup)
    {
        if (count < 2) return;
        var queue = new PriorityQueue<Candidate, (double, int)>(count, CandidateOrder.Instance);
        void TryAdd(int l, int r)
        {
            if (l < 0 || r < 0) return;
            if (lookup(ref symbols[l], ref symbols[r], out double priority, out _))
                queue.Enqueue(new Candidate(l, r, symbols[l].Length + symbols[r].Length), (priority, l));
        }
        for (int i = 1; i < count; i++) TryAdd(i - 1, i);
        while (queue.TryDequeue(out var top, out _))
        {
            ref var left = ref symbols[top.Left];
            ref var right = ref symbols[top.Right];
            // Stale: one side was merged away, or a side grew since the pair was queued.
            if (left.Length == 0 || right.Length == 0 || left.Next != top.Right || left.Length + right.Length != top.Size) continue;
            if (!lookup(ref left, ref right, out _, out int mergedId)) continue;
            left.Length += right.Length;
            left.Id = mergedId;
            right.Length = 0;
            left.Next = right.Next;
            if (right.Next >= 0) symbols[right.Next].Prev = top.Left;
            TryAdd(left.Prev, top.Left);
            TryAdd(top.Left, left.Next);
        }
    }
}
