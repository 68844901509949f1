using System.Collections.Generic;

namespace Moe.Dsl.Validation;

/// <summary>How serious a finding is by default (users may change it in .editorconfig).</summary>
public enum RuleSeverity
{
    /// <summary>The job cannot run, or would fail after launch.</summary>
    Error,

    /// <summary>The job runs, but a setting is ignored or probably wrong.</summary>
    Warning,

    /// <summary>Advice, or a note that a value is checked at start-up.</summary>
    Info,
}

/// <summary>The family a rule belongs to; fixes its ID range.</summary>
public enum RuleCategory
{
    /// <summary>GPU layout against the model (MOE0001-0099).</summary>
    Topology,

    /// <summary>Router, capacity and dispatcher (MOE0100-0199).</summary>
    RouterAndCapacity,

    /// <summary>Data, batches and optimisation (MOE0200-0299).</summary>
    DataAndTraining,

    /// <summary>The plan against the GPU's memory (MOE0300-0399).</summary>
    Memory,

    /// <summary>Things only the launched job can know (MOE0900-0999).</summary>
    StartUp,
}

/// <summary>What a rule is: ID, title, default severity, and which settings it reads.</summary>
public sealed class RuleDescriptor
{
    internal RuleDescriptor(string id, string title, RuleSeverity severity, RuleCategory category, string megatron, IReadOnlyList<string> inputs)
    {
        Id = id;
        Title = title;
        DefaultSeverity = severity;
        Category = category;
        Megatron = megatron;
        Inputs = inputs;
    }

    /// <summary>Stable ID, e.g. "MOE0003".</summary>
    public string Id { get; }

    /// <summary>A title that names the condition.</summary>
    public string Title { get; }

    /// <summary>Default severity.</summary>
    public RuleSeverity DefaultSeverity { get; }

    /// <summary>Rule family.</summary>
    public RuleCategory Category { get; }

    /// <summary>The Megatron-Core rule(s) this mirrors (IDs of shared/spec/megatron-rules.md), or "Moe" for our own.</summary>
    public string Megatron { get; }

    /// <summary>Setting paths the rule reads; when any is unknown at compile time the rule waits for start-up.</summary>
    public IReadOnlyList<string> Inputs { get; }

    /// <summary>The documentation page, relative to the repository root.</summary>
    public string HelpPath => "docs/diagnostics/" + Id + ".md";

    /// <summary>The documentation page as the analyzers' help link: the page's path in the repository.</summary>
    public string HelpLink => HelpPath;
}
