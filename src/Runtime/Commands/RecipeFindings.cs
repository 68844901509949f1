using Moe.Dsl;
using Moe.Dsl.Validation;

namespace Moe.Runtime.Commands;

/// <summary>Runs the one rule set at start-up (after command-line overrides) and reports what it finds.</summary>
public static class RecipeFindings
{
    /// <summary>
    /// Validates <paramref name="settings"/>; writes warnings to stderr and throws a
    /// <see cref="UserError"/> listing every error at once.
    /// </summary>
    public static void ThrowIfInvalid(RecipeSettings settings, StartUpContext? startUp = null, TextWriter? warnings = null)
    {
        var findings = RuleSet.Validate(settings, startUp);
        warnings ??= Console.Error;
        foreach (var f in findings.Where(f => f.Rule.DefaultSeverity != RuleSeverity.Error))
            warnings.WriteLine(Format(f));
        var errors = findings.Where(f => f.Rule.DefaultSeverity == RuleSeverity.Error).ToArray();
        if (errors.Length == 0) return;
        string noun = errors.Length == 1 ? "error" : "errors";
        throw new UserError($"{settings.Name} has {errors.Length} {noun}:{Environment.NewLine}" +
            string.Join(Environment.NewLine, errors.Select(Format)));
    }

    /// <summary>"error MOE0003 [Parallelism.Expert]: … (see docs/diagnostics/MOE0003.md)".</summary>
    public static string Format(Finding f)
    {
        string severity = f.Rule.DefaultSeverity switch
        {
            RuleSeverity.Error => "error",
            RuleSeverity.Warning => "warning",
            _ => "info",
        };
        return $"  {severity} {f.Rule.Id} [{f.PrimaryPath}]: {f.Message} (see {f.Rule.HelpPath})";
    }
}
