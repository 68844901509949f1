using System.Text;
using System.Text.Json.Nodes;
using Moe.Dsl;
using Moe.Dsl.Layout;

namespace Moe.Runtime.Commands.Layout;

/// <summary>Validates a bare layout with the rule set and prints Megatron's groups for it.</summary>
public static class LayoutCommand
{
    /// <summary>Settings a bare layout does not have; the rules that read them are skipped.</summary>
    private static readonly string[] NotGiven =
        ["Model", "Router", "Capacity", "Data", "Training", "Checkpoint", "Parallelism.SequenceParallel"];

    /// <summary>Up to this many ranks the table lists every group, rank and creation run; above it, it summarises.</summary>
    public const int FullTableRanks = 256;

    public static int Execute(Parallelism parallelism, bool json, TextWriter output)
    {
        var settings = new RecipeSettings { Name = "This layout", Parallelism = parallelism, Unknown = NotGiven };
        RecipeFindings.ThrowIfInvalid(settings);
        var layout = new RankLayout(parallelism.Gpus, parallelism.Tensor, parallelism.Pipeline, parallelism.Context,
            parallelism.Expert, parallelism.EffectiveExpertTensor, parallelism.Order);
        // Tens of megabytes at 131,072 ranks: streamed in 64 KiB chunks, never held whole.
        using var buffered = new ChunkedWriter(output);
        if (json) LayoutJson.Write(layout, buffered, indented: true);
        else Render(layout, buffered);
        buffered.WriteLine();
        return 0;
    }

    /// <summary>
    /// A readable table: sizes, every group family, per-rank coordinates and the creation order. Above
    /// <see cref="FullTableRanks"/> ranks it shows the two grids' strides, each family's first groups and its
    /// last, the first and last ranks, and the creation order with its loops folded.
    /// </summary>
    public static void Render(IRankLayout layout, TextWriter output)
    {
        bool full = layout.World <= FullTableRanks;
        string order = RankLayout.OrderName(layout.Order);
        output.Write($"world {layout.World}: tp {layout.Tensor}, pp {layout.Pipeline}, cp {layout.Context}, ep {layout.Expert}, etp {layout.ExpertTensor}, ");
        output.Write($"dp {layout.DataParallel}, edp {layout.ExpertDataParallel}, order {order}\n\n");
        if (!full)
        {
            var dense = RankGrid.Of(layout.Order, layout.Tensor, layout.Context, 1, layout.DataParallel, layout.Pipeline);
            var expert = RankGrid.Of(layout.Order, layout.ExpertTensor, 1, layout.Expert, layout.ExpertDataParallel, layout.Pipeline);
            output.Write($"dense grid   {dense}\nexpert grid  {expert}\n\n");
            output.Write($"{layout.World} ranks, more than {FullTableRanks}: each family shows its first {ShownGroups} groups and its last, a group of more than " +
                $"{ShownMembers} ranks its first {ShownMembers - 1} and its last; --json lists everything.\n\n");
        }
        output.Write("groups\n");
        foreach (var key in RankLayout.FamilyKeys)
        {
            int count = layout.GroupCount(key);
            output.Write("  ");
            output.Write(key.PadRight(20));
            output.Write($"{count} × {layout.Group(key, 0).Length}: ");
            for (int g = 0; g < count; g++)
            {
                if (!full && g == ShownGroups && count > ShownGroups + 1)
                {
                    output.Write($"… ({count - ShownGroups - 1} more) ");
                    g = count - 1;
                }
                var members = layout.Group(key, g);
                output.Write('[');
                output.Write(full || members.Length <= ShownMembers
                    ? string.Join(",", members)
                    : string.Join(",", members.Take(ShownMembers - 1)) + ",…," + members[^1]);
                output.Write(g == count - 1 ? "]\n" : "] ");
            }
        }
        int width = Math.Max(4, (layout.World - 1).ToString(System.Globalization.CultureInfo.InvariantCulture).Length);
        output.Write("\n" + "rank".PadLeft(width) + "   tp  cp  dp  pp  dp_cp  ep  etp  edp\n");
        for (int r = 0; r < layout.World; r++)
        {
            if (!full && r == ShownRanks && layout.World > ShownRanks + 1)
            {
                output.Write("…".PadLeft(width) + "\n");
                r = layout.World - 1;
            }
            var c = layout.Coordinates(r);
            output.Write($"{r.ToString(System.Globalization.CultureInfo.InvariantCulture).PadLeft(width)}  {c.Tp,3} {c.Cp,3} {c.Dp,3} {c.Pp,3} {c.DpCp,6} {c.Ep,3} {c.Etp,4} {c.Edp,4}\n");
        }
        output.Write("\ncommunicator creation order\n");
        var runs = layout.CreationOrder;
        for (int i = 0; i < runs.Count;)
        {
            int period = full ? 0 : Period(runs, i);
            if (period == 0)
            {
                var c = runs[i++];
                output.Write($"  {c.Description} ({c.Backend}) {c.GroupsKey}[{c.FirstIndex}..{c.FirstIndex + c.Count - 1}]\n");
                continue;
            }
            int end = i + period;
            while (end + period <= runs.Count && Repeats(runs, end - period, period)) end += period;
            int first = runs[i].FirstIndex, last = runs[end - 1].FirstIndex;
            output.Write($"  for each i in {first}..{last}: " + string.Join(", ", Enumerable.Range(i, period).Select(k => $"{runs[k].Description} ({runs[k].Backend}) {runs[k].GroupsKey}[i]")) + "\n");
            i = end;
        }
    }

    private const int ShownGroups = 3, ShownMembers = 16, ShownRanks = 8;

    /// <summary>
    /// The length (2 or 3) of a loop starting at <paramref name="start"/> that creates one group of each of its runs per
    /// iteration (a family with its Gloo twin; pipeline, embedding and position-embedding), or 0.
    /// </summary>
    private static int Period(IReadOnlyList<GroupCreation> runs, int start)
    {
        foreach (int period in new[] { 3, 2 })
        {
            if (start + 2 * period > runs.Count) continue;
            bool oneGroupEach = Enumerable.Range(start, period).All(k => runs[k].Count == 1 && runs[k].FirstIndex == runs[start].FirstIndex)
                && Enumerable.Range(start, period).Select(k => runs[k].Description).Distinct().Count() == period;
            if (oneGroupEach && Repeats(runs, start, period)) return period;
        }
        return 0;
    }

    /// <summary>Whether the <paramref name="period"/> runs after <paramref name="start"/>'s repeat them for the next group index.</summary>
    private static bool Repeats(IReadOnlyList<GroupCreation> runs, int start, int period) =>
        Enumerable.Range(start, period).All(k =>
        {
            var a = runs[k];
            var b = runs[k + period];
            return b.Description == a.Description && b.Backend == a.Backend && b.GroupsKey == a.GroupsKey && b.Count == 1 && b.FirstIndex == a.FirstIndex + 1;
        });

    /// <summary>Buffers writes and hands them on in 64 KiB chunks, so that Console.Out (which flushes every write) is not called per number.</summary>
    private sealed class ChunkedWriter(TextWriter inner) : TextWriter
    {
        private readonly char[] _buffer = new char[1 << 16];
        private int _used;

        public override Encoding Encoding => inner.Encoding;

        public override void Write(char value)
        {
            if (_used == _buffer.Length) Flush();
            _buffer[_used++] = value;
        }

        public override void Write(char[] buffer, int index, int count)
        {
            while (count > 0)
            {
                if (_used == _buffer.Length) Flush();
                int n = Math.Min(count, _buffer.Length - _used);
                Array.Copy(buffer, index, _buffer, _used, n);
                _used += n;
                index += n;
                count -= n;
            }
        }

        public override void Write(string? value)
        {
            if (value is null) return;
            for (int at = 0; at < value.Length;)
            {
                if (_used == _buffer.Length) Flush();
                int n = Math.Min(value.Length - at, _buffer.Length - _used);
                value.CopyTo(at, _buffer, _used, n);
                _used += n;
                at += n;
            }
        }

        public override void Flush()
        {
            if (_used > 0) inner.Write(_buffer, 0, _used);
            _used = 0;
            inner.Flush();
        }

        protected override void Dispose(bool disposing)
        {
            if (disposing) Flush();
            base.Dispose(disposing);
        }
    }
}
