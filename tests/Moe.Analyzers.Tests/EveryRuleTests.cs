using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.Testing;
using Moe.Dsl;
using Moe.Dsl.Tests.Rules;
using Moe.Dsl.Validation;
using Xunit;
using RuleSet = Moe.Dsl.Validation.RuleSet;

namespace Moe.Analyzers.Tests;

/// <summary>
/// For every rule a constant recipe can break: the recipe of the rule's test case (RuleCases, whose
/// messages are checked against hand arithmetic in Moe.Dsl.Tests) written as source, compiled, and
/// analysed — the analyzers must report exactly the rule set's findings, each at its setting; the nearby
/// valid recipe must not report the rule.
/// </summary>
public class EveryRuleTests
{
    public static TheoryData<RuleCases.Case> Cases()
    {
        var data = new TheoryData<RuleCases.Case>();
        foreach (var c in RuleCases.All()) data.Add(c);
        return data;
    }

    private static async Task Check(RecipeSettings settings)
    {
        var findings = RuleSet.Validate(settings);
        string source = RecipeSource.Render(settings, findings.Select(f => f.PrimaryPath).ToArray(), out var markers);
        foreach (var (category, run) in Analyzers)
        {
            var expected = findings.Where(f => f.Rule.Category == category)
                .Select(f => Verify.Diagnostic(f.Rule.Id, Severity(f.Rule.DefaultSeverity)).WithLocation(markers[f.PrimaryPath]).WithMessage(f.Message))
                .ToArray();
            await run(source, expected);
        }
    }

    private static readonly (RuleCategory, Func<string, DiagnosticResult[], Task>)[] Analyzers =
    [
        (RuleCategory.Topology, (s, e) => Verify.Analyzer<TopologyAnalyzer>(s, e)),
        (RuleCategory.RouterAndCapacity, (s, e) => Verify.Analyzer<RouterAndCapacityAnalyzer>(s, e)),
        (RuleCategory.DataAndTraining, (s, e) => Verify.Analyzer<DataAndTrainingAnalyzer>(s, e)),
        (RuleCategory.Memory, (s, e) => Verify.Analyzer<MemoryAnalyzer>(s, e)),
    ];

    private static DiagnosticSeverity Severity(RuleSeverity s) => s switch
    {
        RuleSeverity.Error => DiagnosticSeverity.Error,
        RuleSeverity.Warning => DiagnosticSeverity.Warning,
        _ => DiagnosticSeverity.Info,
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task ViolatingRecipe_IsReportedAtCompileTime(RuleCases.Case c)
    {
        Assert.Contains(RuleSet.Validate(c.Violating), f => f.Rule.Id == c.Id);
        await Check(c.Violating);
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task NearbyValidRecipe_IsNotReportedForTheRule(RuleCases.Case c)
    {
        Assert.DoesNotContain(RuleSet.Validate(c.Passing), f => f.Rule.Id == c.Id);
        await Check(c.Passing);
    }
}
