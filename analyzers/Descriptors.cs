using System.Collections.Immutable;
using System.Linq;
using Microsoft.CodeAnalysis;
using Moe.Dsl.Validation;
using RuleSet = Moe.Dsl.Validation.RuleSet;

namespace Moe.Analyzers;

/// <summary>One DiagnosticDescriptor per rule of the rule set (IDs in Moe.Dsl.Validation.DiagnosticIds).</summary>
internal static class Descriptors
{
    public static readonly ImmutableDictionary<string, DiagnosticDescriptor> ById =
        RuleSet.Descriptors.ToImmutableDictionary(d => d.Id, Create);

    public static ImmutableArray<DiagnosticDescriptor> Of(RuleCategory category) =>
        RuleSet.Descriptors.Where(d => d.Category == category).Select(d => ById[d.Id]).ToImmutableArray();

    private static DiagnosticDescriptor Create(RuleDescriptor d) => new(
        d.Id,
        d.Title,
        "{0}",
        "Moe." + d.Category,
        d.DefaultSeverity switch
        {
            RuleSeverity.Error => DiagnosticSeverity.Error,
            RuleSeverity.Warning => DiagnosticSeverity.Warning,
            _ => DiagnosticSeverity.Info,
        },
        isEnabledByDefault: true,
        description: $"Megatron-Core rule {d.Megatron}. See {d.HelpPath}.",
        helpLinkUri: d.HelpLink);
}
