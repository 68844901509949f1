using System;
using System.Collections.Generic;
using System.Linq;

namespace Moe.Dsl.Validation;

/// <summary>
/// The one rule set. Every rule a recipe can violate is a pure function over <see cref="RecipeSettings"/>,
/// used by the analyzers at compile time, by the generator, and by the runtime at start-up (after
/// command-line overrides, with the real world size). <see cref="Validate"/> returns every finding at once.
/// </summary>
public static partial class RuleSet
{
    private sealed class Rule
    {
        public Rule(RuleDescriptor descriptor, Func<RecipeSettings, StartUpContext?, IEnumerable<Finding>> check)
        {
            Descriptor = descriptor;
            Check = check;
        }

        public RuleDescriptor Descriptor { get; }

        public Func<RecipeSettings, StartUpContext?, IEnumerable<Finding>> Check { get; }
    }

    /// <summary>The informational "checked at start-up" descriptor the analyzer reports for a value it cannot evaluate.</summary>
    public static RuleDescriptor CheckedAtStartUp { get; } = new(
        DiagnosticIds.CheckedAtStartUp, "Setting is checked at start-up", RuleSeverity.Info, RuleCategory.StartUp, "Moe", Array.Empty<string>());

    private static readonly Rule[] Rules = TopologyRules().Concat(RouterRules()).Concat(DataRules()).Concat(MemoryRules()).Concat(RecomputeRules()).Concat(StartUpRules()).ToArray();

    /// <summary>Every rule's descriptor, in ID order (including the analyzer-only <see cref="CheckedAtStartUp"/>).</summary>
    public static IReadOnlyList<RuleDescriptor> Descriptors { get; } =
        Rules.Select(r => r.Descriptor).Concat(new[] { CheckedAtStartUp }).OrderBy(d => d.Id, StringComparer.Ordinal).ToArray();

    /// <summary>The descriptor with this ID.</summary>
    public static RuleDescriptor Descriptor(string id) =>
        Descriptors.FirstOrDefault(d => d.Id == id) ?? throw new ArgumentException($"No Moe rule has the ID {id}.", nameof(id));

    /// <summary>
    /// Runs every rule whose inputs are known and returns all findings, ordered by rule ID.
    /// Start-up rules run only when <paramref name="startUp"/> is given.
    /// </summary>
    public static IReadOnlyList<Finding> Validate(RecipeSettings settings, StartUpContext? startUp = null)
    {
        if (settings is null) throw new ArgumentNullException(nameof(settings));
        var findings = new List<Finding>();
        foreach (var rule in Rules)
        {
            if (rule.Descriptor.Category == RuleCategory.StartUp && startUp is null) continue;
            if (rule.Descriptor.Inputs.Any(settings.IsUnknown)) continue;
            findings.AddRange(rule.Check(settings, startUp));
        }
        return findings;
    }

    /// <summary>Rules skipped because a setting they read is not known (for the analyzer's "checked at start-up" note).</summary>
    public static IReadOnlyList<RuleDescriptor> Deferred(RecipeSettings settings) =>
        Rules.Where(r => r.Descriptor.Category != RuleCategory.StartUp && r.Descriptor.Inputs.Any(settings.IsUnknown))
             .Select(r => r.Descriptor).ToArray();

    private static RuleDescriptor D(string id, string title, RuleCategory category, string megatron, params string[] inputs) =>
        new(id, title, RuleSeverity.Error, category, megatron, inputs);

    private static RuleDescriptor W(string id, string title, RuleCategory category, string megatron, params string[] inputs) =>
        new(id, title, RuleSeverity.Warning, category, megatron, inputs);

    private static Finding[] One(RuleDescriptor d, string message, SuggestedFix? fix, params string[] paths) =>
        new[] { new Finding(d, message, paths, fix) };

    private static readonly Finding[] None = Array.Empty<Finding>();

    private static SuggestedFix SetFix(string path, int value) =>
        new($"Set {Leaf(path)} = {Arithmetic.F(value)}", path, Arithmetic.F(value));

    private static string Leaf(string path) => path.Substring(path.LastIndexOf('.') + 1);
}
