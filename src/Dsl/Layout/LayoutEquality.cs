using System;
using System.Collections.Generic;
using System.Linq;

namespace Moe.Dsl.Layout;

/// <summary>Compares two <see cref="IRankLayout"/>s member by member, for tests and start-up checks.</summary>
public static class LayoutEquality
{
    /// <summary>
    /// What differs between <paramref name="expected"/> and <paramref name="actual"/>, one readable line each,
    /// at most <paramref name="limit"/> lines; empty when they are equal. Compared: the sizes and order, the
    /// creation runs, every group of every family, and for each rank of <paramref name="ranks"/> (every rank when
    /// null) its coordinates, its group index in every family and, in every family whose groups are smaller than
    /// the world, its group (<see cref="IRankLayout.GroupOf"/>; for intra_dist_opt that would cost W² — its one group
    /// is already compared whole).
    /// </summary>
    public static IReadOnlyList<string> Differences(IRankLayout expected, IRankLayout actual, IEnumerable<int>? ranks = null, int limit = 20)
    {
        if (expected is null) throw new ArgumentNullException(nameof(expected));
        if (actual is null) throw new ArgumentNullException(nameof(actual));
        var found = new List<string>();
        bool Add(string difference)
        {
            if (found.Count < limit) found.Add(difference);
            return found.Count >= limit;
        }

        foreach (var (name, e, a) in new (string, int, int)[]
        {
            ("World", expected.World, actual.World), ("Tensor", expected.Tensor, actual.Tensor), ("Pipeline", expected.Pipeline, actual.Pipeline),
            ("Context", expected.Context, actual.Context), ("Expert", expected.Expert, actual.Expert), ("ExpertTensor", expected.ExpertTensor, actual.ExpertTensor),
            ("DataParallel", expected.DataParallel, actual.DataParallel), ("ExpertDataParallel", expected.ExpertDataParallel, actual.ExpertDataParallel),
        })
            if (e != a && Add($"{name}: expected {e}, actual {a}")) return found;
        if (expected.Order != actual.Order && Add($"Order: expected {expected.Order}, actual {actual.Order}")) return found;
        if (expected.World != actual.World) return found;

        var expectedRuns = expected.CreationOrder;
        var actualRuns = actual.CreationOrder;
        if (expectedRuns.Count != actualRuns.Count && Add($"CreationOrder: expected {expectedRuns.Count} runs, actual {actualRuns.Count}")) return found;
        for (int i = 0; i < Math.Min(expectedRuns.Count, actualRuns.Count); i++)
            if (expectedRuns[i] != actualRuns[i] && Add($"CreationOrder[{i}]: expected {expectedRuns[i]}, actual {actualRuns[i]}")) return found;

        var partial = new List<string>();
        foreach (var family in RankLayout.FamilyKeys)
        {
            int count = expected.GroupCount(family);
            if (count != actual.GroupCount(family))
            {
                if (Add($"{family}: expected {count} groups, actual {actual.GroupCount(family)}")) return found;
                continue;
            }
            bool smaller = true;
            for (int g = 0; g < count; g++)
            {
                var e = expected.Group(family, g);
                var a = actual.Group(family, g);
                if (e.Length == expected.World) smaller = false;
                if (!e.SequenceEqual(a) && Add($"{family}[{g}]: expected [{Show(e)}], actual [{Show(a)}]")) return found;
            }
            if (smaller) partial.Add(family);
        }

        foreach (int rank in ranks ?? Enumerable.Range(0, expected.World))
        {
            var e = expected.Coordinates(rank);
            var a = actual.Coordinates(rank);
            if (e != a && Add($"Coordinates({rank}): expected {e}, actual {a}")) return found;
            foreach (var family in RankLayout.FamilyKeys)
            {
                int ei = expected.GroupIndexOf(family, rank), ai = actual.GroupIndexOf(family, rank);
                if (ei != ai && Add($"GroupIndexOf({family}, {rank}): expected {ei}, actual {ai}")) return found;
            }
            foreach (var family in partial)
            {
                var eg = expected.GroupOf(family, rank);
                var ag = actual.GroupOf(family, rank);
                if (!eg.SequenceEqual(ag) && Add($"GroupOf({family}, {rank}): expected [{Show(eg)}], actual [{Show(ag)}]")) return found;
            }
        }
        return found;
    }

    private static string Show(int[] members) => members.Length <= 16
        ? string.Join(",", members)
        : string.Join(",", members.Take(12)) + ",…," + string.Join(",", members.Skip(members.Length - 2)) + $" ({members.Length} ranks)";
}
