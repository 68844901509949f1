using Microsoft.CodeAnalysis;
using Moe.Dsl.Validation;
using RuleSet = Moe.Dsl.Validation.RuleSet;
using Xunit;

namespace Moe.Analyzers.Tests;

/// <summary>Findings reported at the initializer that must change, with the rule set's full message.</summary>
public class AnalyzerTests
{
    [Fact]
    public async Task ExpertNotDividingExperts_ReportsMOE0003OnTheAssignment()
    {
        await Verify.Analyzer<TopologyAnalyzer>("""
            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x22B;
                public override Parallelism Parallelism => new() { Gpus = 64, Tensor = 2, Pipeline = 2, {|#0:Expert = 16|}, SequenceParallel = true };
            }
            """,
            Verify.Diagnostic("MOE0003").WithLocation(0).WithMessage("Expert (16) must divide the 8 experts of Mixtral 8x22B; valid: 1, 2, 4, 8"));
    }

    [Fact]
    public async Task ValidRecipe_HasNoFinding()
    {
        await Verify.Analyzer<TopologyAnalyzer>("""
            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x22B;
                public override Parallelism Parallelism => new() { Gpus = 32, Tensor = 2, Pipeline = 2, Expert = 8, SequenceParallel = true };
                public override Training Training => new() { GlobalBatchSize = 256 };
            }
            """);
    }

    [Fact]
    public async Task MissingSequenceParallel_IsReportedAtTheParallelismInitializer()
    {
        await Verify.Analyzer<TopologyAnalyzer>("""
            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => {|#0:new() { Gpus = 16, Tensor = 2, Expert = 8 }|};
            }
            """,
            Verify.Diagnostic("MOE0010").WithLocation(0).WithMessage("Tensor (2) > 1 in an MoE model needs SequenceParallel = true (Megatron's MoE layer raises at the first training step otherwise)"));
    }

    [Fact]
    public async Task ConstantsArithmeticWithAndInheritance_AreEvaluated()
    {
        // Gpus = 4 * Nodes = 32 (a constant), the model is a `with` variant, and the parallelism comes from the base recipe.
        await Verify.Analyzer<TopologyAnalyzer>("""
            public abstract class Base : Recipe
            {
                protected const int Nodes = 8;
                public override Parallelism Parallelism => new() { {|#0:Gpus = 4 * Nodes|}, Pipeline = 3, Expert = 8 };
            }

            [Recipe]
            public sealed partial class R : Base
            {
                public override Model Model => Model.Mixtral8x7B with { Layers = 30 };
            }
            """,
            Verify.Diagnostic("MOE0002").WithLocation(0).WithMessage("Gpus (32) must be a multiple of Tensor × Pipeline × Context = 1 × 3 × 1 = 3, so that data parallel (Gpus / 3) is whole; valid Gpus near 32: 24, 48"),
            Verify.Diagnostic("MOE0004").WithLocation(0).WithMessage("Gpus (32) must be a multiple of ExpertTensor × Expert × Pipeline = 1 × 8 × 3 = 24 so that expert data parallel is whole (Megatron finds this only after launch; ExpertTensor defaults to Tensor); valid Gpus near 32: 24, 48"));
    }

    [Fact]
    public async Task UserPreset_IsEvaluatedFromItsSource()
    {
        await Verify.Analyzer<RouterAndCapacityAnalyzer>("""
            public static class Presets
            {
                public static Router Wide { get; } = new() { TopK = 9 };
            }

            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Router Router => {|#0:Presets.Wide|};
            }
            """,
            Verify.Diagnostic("MOE0101").WithLocation(0).WithMessage("TopK (9) must be between 1 and the 8 experts of Mixtral 8x7B"));
    }

    [Fact]
    public async Task NonConstantValue_IsCheckedAtStartUp_AndItsRulesWait()
    {
        // Expert comes from a method: MOE0003 cannot be decided, so only the informational MOE0902 appears.
        await Verify.Analyzer<CheckedAtStartUpAnalyzer>("""
            [Recipe]
            public sealed partial class R : Recipe
            {
                static int FromEnvironment() => int.Parse(System.Environment.GetEnvironmentVariable("EP") ?? "8");
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => new() { Gpus = 32, Expert = {|#0:FromEnvironment()|} };
            }
            """,
            Verify.Diagnostic("MOE0902", DiagnosticSeverity.Info).WithLocation(0)
                .WithMessage("Parallelism.Expert is not a compile-time constant (it calls FromEnvironment()); its rules (MOE0001, MOE0002, MOE0003, MOE0004, MOE0005, MOE0301) are checked at start-up"));
        await Verify.Analyzer<TopologyAnalyzer>("""
            [Recipe]
            public sealed partial class R : Recipe
            {
                static int FromEnvironment() => 16;
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => new() { Gpus = 32, Expert = FromEnvironment() };
            }
            """);
    }

    [Fact]
    public async Task SeveralRules_AreAllReported()
    {
        await Verify.Analyzer<DataAndTrainingAnalyzer>("""
            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => new() { Gpus = 32, Expert = 8 };
                public override Training Training => new() { {|#0:GlobalBatchSize = 100|}, {|#1:WarmupSteps = 2000|}, Steps = 1000 };
                public override Data Data => new() { {|#2:SequenceLength = 65536|} };
            }
            """,
            Verify.Diagnostic("MOE0202").WithLocation(0).WithMessage("GlobalBatchSize (100) must be a multiple of MicroBatchSize × data parallel = 1 × 32 = 32 (data parallel = Gpus / (Tensor·Pipeline·Context) = 32 / 1); valid GlobalBatchSize near 100: 96, 128"),
            Verify.Diagnostic("MOE0213", Microsoft.CodeAnalysis.DiagnosticSeverity.Warning).WithLocation(1).WithMessage("WarmupSteps (2000) exceeds Steps (1000): the warm-up is capped at 1000 steps, so the learning rate reaches its peak only at the last step"),
            Verify.Diagnostic("MOE0204").WithLocation(2).WithMessage("SequenceLength (65536) exceeds the 32768 positions of Mixtral 8x7B"));
    }

    [Fact]
    public void EveryDescriptor_LinksToAnExistingDiagnosticsPage()
    {
        var analyzers = new Microsoft.CodeAnalysis.Diagnostics.DiagnosticAnalyzer[] { new TopologyAnalyzer(), new RouterAndCapacityAnalyzer(), new DataAndTrainingAnalyzer(), new MemoryAnalyzer(), new CheckedAtStartUpAnalyzer() };
        var descriptors = analyzers.SelectMany(a => a.SupportedDiagnostics).ToArray();
        Assert.Equal(RuleSet.Descriptors.Count(d => d.Category != RuleCategory.StartUp) + 1, descriptors.Length);
        foreach (var d in descriptors)
        {
            Assert.Equal($"docs/diagnostics/{d.Id}.md", d.HelpLinkUri);
            Assert.True(File.Exists(Path.Combine(Moe.Tests.TestPaths.RepoRoot, d.HelpLinkUri)), d.HelpLinkUri);
        }
    }
}

public class SeverityTests
{
    private const string Recipe = """
        [Recipe]
        public sealed partial class R : Recipe
        {
            public override Model Model => Model.Mixtral8x22B;
            public override Parallelism Parallelism => new() { Gpus = 64, Tensor = 2, Pipeline = 2, {|#0:Expert = 16|}, SequenceParallel = true };
        }
        """;

    [Fact]
    public async Task EditorConfig_CanLowerARuleToAWarning()
    {
        await Verify.Analyzer<TopologyAnalyzer>(Recipe, "root = true\n\n[*.cs]\ndotnet_diagnostic.MOE0003.severity = warning\n",
            Verify.Diagnostic("MOE0003", DiagnosticSeverity.Warning).WithLocation(0).WithMessage("Expert (16) must divide the 8 experts of Mixtral 8x22B; valid: 1, 2, 4, 8"));
    }

    // 8x22B on 8 GPUs (EP 8, TP 1, PP 1): each GPU holds all 56 layers' attention and one expert per layer,
    // far beyond any GPU. A warning by default (the message is checked in RuleCases; that .editorconfig makes it an
    // error in a real build is checked by the template's end-to-end test).
    private const string TooBig = """
        [Recipe]
        public sealed partial class R : Recipe
        {
            public override Model Model => Model.Mixtral8x22B;
            public override Parallelism Parallelism => new() { Gpus = 8, Expert = 8, {|#0:Gpu = Gpu.H100|} };
            public override Training Training => new() { GlobalBatchSize = 8 };
        }
        """;

    [Fact]
    public async Task PlanThatDoesNotFit_IsAWarningByDefault()
    {
        await Verify.Analyzer<MemoryAnalyzer>(TooBig,
            Verify.Diagnostic("MOE0301", DiagnosticSeverity.Warning).WithLocation(0).WithMessage(TooBigMessage));
    }

    private static string TooBigMessage => Moe.Dsl.Validation.RuleSet.Validate(new Moe.Dsl.RecipeSettings
    {
        Name = "R",
        Model = Moe.Dsl.Model.Mixtral8x22B,
        Parallelism = new Moe.Dsl.Parallelism { Gpus = 8, Expert = 8, Gpu = Moe.Dsl.Gpu.H100 },
        Training = new Moe.Dsl.Training { GlobalBatchSize = 8 },
    }).Single(f => f.Rule.Id == "MOE0301").Message;

    [Fact]
    public async Task EditorConfig_CanSilenceARule()
    {
        await Verify.Analyzer<TopologyAnalyzer>(Recipe.Replace("{|#0:Expert = 16|}", "Expert = 16"), "root = true\n\n[*.cs]\ndotnet_diagnostic.MOE0003.severity = none\n");
    }
}
