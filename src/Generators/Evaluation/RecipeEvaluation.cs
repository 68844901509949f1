using System.Collections.Generic;
using Microsoft.CodeAnalysis;
using Moe.Dsl;

namespace Moe.Generators.Evaluation;

/// <summary>A setting whose value is not a compile-time constant.</summary>
public sealed class UnknownSetting
{
    public UnknownSetting(string path, Location location, string reason)
    {
        Path = path;
        Location = location;
        Reason = reason;
    }

    /// <summary>The setting path, e.g. "Parallelism.Gpus".</summary>
    public string Path { get; }

    public Location Location { get; }

    /// <summary>Why it could not be evaluated, e.g. "a method call".</summary>
    public string Reason { get; }
}

/// <summary>A recipe evaluated from source: its settings, where each was set, and what could not be evaluated.</summary>
public sealed class RecipeEvaluation
{
    public RecipeEvaluation(RecipeSettings settings, IReadOnlyDictionary<string, Location> locations, IReadOnlyList<UnknownSetting> unknown, Location classLocation)
    {
        Settings = settings;
        Locations = locations;
        Unknown = unknown;
        ClassLocation = classLocation;
    }

    public RecipeSettings Settings { get; }

    /// <summary>Setting path → the syntax that set it ("Parallelism.Expert" → <c>Expert = 16</c>; "Parallelism" → the property's value).</summary>
    public IReadOnlyDictionary<string, Location> Locations { get; }

    public IReadOnlyList<UnknownSetting> Unknown { get; }

    /// <summary>The recipe class's identifier.</summary>
    public Location ClassLocation { get; }

    /// <summary>Where a finding about <paramref name="path"/> belongs: that setting, else the nearest enclosing one, else the class.</summary>
    public Location LocationOf(string path)
    {
        for (string p = path; p.Length > 0; p = p.Contains(".") ? p.Substring(0, p.LastIndexOf('.')) : "")
        {
            if (Locations.TryGetValue(p, out var location)) return location;
        }
        return ClassLocation;
    }
}
