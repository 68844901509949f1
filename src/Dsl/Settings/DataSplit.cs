using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text.RegularExpressions;

namespace Moe.Dsl;

/// <summary>
/// Megatron's <c>--split</c> weights ("990,9,1"): the numbers are read, padded with zeros to three
/// (train, valid, test) and normalised by their sum.
/// </summary>
public static class DataSplit
{
    private static readonly Regex Number = new("[^,\\s]+", RegexOptions.CultureInvariant);

    /// <summary>Parses a split string into three normalised weights, or says what is wrong with it.</summary>
    public static bool TryParse(string? split, out double[] weights, out string error)
    {
        weights = Array.Empty<double>();
        error = "";
        if (string.IsNullOrWhiteSpace(split))
        {
            error = "it is empty; write three weights such as \"990,9,1\"";
            return false;
        }
        var values = new List<double>();
        foreach (Match m in Number.Matches(split))
        {
            if (!double.TryParse(m.Value, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double v) || double.IsNaN(v) || double.IsInfinity(v))
            {
                error = $"\"{m.Value}\" is not a non-negative number";
                return false;
            }
            values.Add(v);
        }
        if (values.Count > 3)
        {
            error = $"it has {values.Count} weights; at most three (train, valid, test)";
            return false;
        }
        while (values.Count < 3) values.Add(0);
        double sum = values[0] + values[1] + values[2];
        if (!(sum > 0))
        {
            error = "its weights add up to 0";
            return false;
        }
        weights = new[] { values[0] / sum, values[1] / sum, values[2] / sum };
        return true;
    }
}
