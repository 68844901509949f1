using System.Collections.Generic;

namespace Moe.Dsl.Validation;

/// <summary>One violated rule: what, where (setting paths) and, when one fix is obvious, the fix.</summary>
public sealed class Finding
{
    /// <summary>Creates a finding.</summary>
    public Finding(RuleDescriptor rule, string message, IReadOnlyList<string> paths, SuggestedFix? fix = null)
    {
        Rule = rule;
        Message = message;
        Paths = paths;
        Fix = fix;
    }

    /// <summary>The rule.</summary>
    public RuleDescriptor Rule { get; }

    /// <summary>The message, with the arithmetic and the valid alternatives.</summary>
    public string Message { get; }

    /// <summary>The settings concerned; the first is the one to change (where the analyzer reports).</summary>
    public IReadOnlyList<string> Paths { get; }

    /// <summary>The obvious fix, if there is one.</summary>
    public SuggestedFix? Fix { get; }

    /// <summary>The setting to change.</summary>
    public string PrimaryPath => Paths.Count > 0 ? Paths[0] : "";

    /// <inheritdoc />
    public override string ToString() => $"{Rule.Id} [{PrimaryPath}]: {Message}";
}

/// <summary>
/// A fix for a finding: set <see cref="Path"/> to the C# expression <see cref="Value"/>, or remove
/// the setting's assignment when <see cref="Value"/> is null.
/// </summary>
public sealed class SuggestedFix
{
    /// <summary>Creates a fix.</summary>
    public SuggestedFix(string title, string path, string? value)
    {
        Title = title;
        Path = path;
        Value = value;
    }

    /// <summary>What the fix does, e.g. "Set Expert = 8".</summary>
    public string Title { get; }

    /// <summary>The setting path, e.g. "Parallelism.Expert".</summary>
    public string Path { get; }

    /// <summary>The new value as a C# expression, or null to remove the assignment.</summary>
    public string? Value { get; }
}

/// <summary>What only the launched job knows: the real world size, the environment, the file system.</summary>
public sealed class StartUpContext
{
    /// <summary>The launcher's WORLD_SIZE, if known.</summary>
    public int? WorldSize { get; init; }

    /// <summary>Reads an environment variable (defaults to the process environment).</summary>
    public System.Func<string, string?> Environment { get; init; } = System.Environment.GetEnvironmentVariable;

    /// <summary>Whether a file exists (defaults to the file system).</summary>
    public System.Func<string, bool> FileExists { get; init; } = System.IO.File.Exists;

    /// <summary>True when the job runs on CUDA GPUs older than Blackwell (H100, H200, A100).</summary>
    public bool PreBlackwellGpu { get; init; }
}
