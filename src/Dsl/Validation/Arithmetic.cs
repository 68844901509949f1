using System;
using System.Collections.Generic;
using System.Globalization;
using System.Linq;

namespace Moe.Dsl.Validation;

/// <summary>Small integer helpers for rule messages: divisors, multiples, formatting.</summary>
public static class Arithmetic
{
    /// <summary>All positive divisors of <paramref name="n"/>, ascending.</summary>
    public static IReadOnlyList<int> Divisors(int n)
    {
        var result = new List<int>();
        if (n <= 0) return result;
        for (int d = 1; (long)d * d <= n; d++)
        {
            if (n % d != 0) continue;
            result.Add(d);
            if (d != n / d) result.Add(n / d);
        }
        result.Sort();
        return result;
    }

    /// <summary>The candidate closest to <paramref name="value"/>; ties go to the smaller one.</summary>
    public static int Nearest(IEnumerable<int> candidates, int value) =>
        candidates.OrderBy(c => Math.Abs((long)c - value)).ThenBy(c => c).First();

    /// <summary>The multiples of <paramref name="step"/> just below and just above <paramref name="value"/> (positive only).</summary>
    public static IReadOnlyList<int> NeighbouringMultiples(int value, int step)
    {
        if (step <= 0) return Array.Empty<int>();
        long below = (long)Math.Max(value, 0) / step * step;
        long above = below + step;
        var result = new List<int>();
        if (below > 0 && below != value) result.Add((int)below);
        if (above <= int.MaxValue) result.Add((int)above);
        return result;
    }

    /// <summary>The smallest multiple of <paramref name="step"/> that is at least <paramref name="value"/> and positive.</summary>
    public static int CeilMultiple(int value, int step) =>
        step <= 0 ? value : (int)Math.Max(step, ((long)value + step - 1) / step * step);

    /// <summary>Greatest common divisor.</summary>
    public static long Gcd(long a, long b)
    {
        while (b != 0) (a, b) = (b, a % b);
        return Math.Abs(a);
    }

    /// <summary>Least common multiple of two positive numbers.</summary>
    public static long Lcm(long a, long b) => a == 0 || b == 0 ? 0 : Math.Abs(a / Gcd(a, b) * b);

    /// <summary>"1, 2, 4, 8" (at most <paramref name="max"/> items, then "…").</summary>
    public static string Join(IEnumerable<int> values, int max = 12)
    {
        var list = values.ToList();
        string head = string.Join(", ", list.Take(max).Select(v => v.ToString(CultureInfo.InvariantCulture)));
        return list.Count > max ? head + ", …" : head;
    }

    /// <summary>Invariant formatting for messages.</summary>
    public static string F(double value) => value.ToString("R", CultureInfo.InvariantCulture);

    /// <summary>Invariant formatting for messages.</summary>
    public static string F(int value) => value.ToString(CultureInfo.InvariantCulture);
}
