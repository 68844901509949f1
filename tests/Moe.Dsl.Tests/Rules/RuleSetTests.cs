using Moe.Dsl;
using Moe.Dsl.Validation;
using Xunit;

namespace Moe.Dsl.Tests.Rules;

public class RuleSetTests
{
    public static TheoryData<RuleCases.Case> Cases()
    {
        var data = new TheoryData<RuleCases.Case>();
        foreach (var c in RuleCases.All()) data.Add(c);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void ViolatingRecipe_ReportsTheRuleAtTheSettingToChange(RuleCases.Case c)
    {
        var findings = RuleSet.Validate(c.Violating).Where(f => f.Rule.Id == c.Id).ToArray();
        var finding = Assert.Single(findings, f => f.PrimaryPath == c.Path);
        foreach (var part in c.MessageParts) Assert.Contains(part, finding.Message);
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void NearbyValidRecipe_DoesNotReportTheRule(RuleCases.Case c)
    {
        Assert.DoesNotContain(RuleSet.Validate(c.Passing), f => f.Rule.Id == c.Id);
    }

    [Fact]
    public void EveryConstantRule_HasACase()
    {
        var covered = RuleCases.All().Select(c => c.Id).ToHashSet();
        var constantRules = RuleSet.Descriptors.Where(d => d.Category != RuleCategory.StartUp).Select(d => d.Id);
        Assert.Empty(constantRules.Except(covered));
    }

    [Fact]
    public void StopOnASignalWhoseCheckIsOff_IsReported()
    {
        var s = RuleCases.Base with { Health = new Health { StopOn = HealthSignal.DropRate | HealthSignal.Loss, LossWindow = null } };
        var f = Assert.Single(RuleSet.Validate(s), f => f.Rule.Id == DiagnosticIds.HealthSettingInvalid);
        Assert.Equal("Health.StopOn", f.PrimaryPath);
        Assert.Equal("Health StopOn includes Loss but LossWindow is null, so that check is off and can never stop the run: set LossWindow or remove Loss from StopOn", f.Message);
    }

    [Fact]
    public void ValidBase_YieldsNoFinding()
    {
        Assert.Empty(RuleSet.Validate(RuleCases.Base));
    }

    [Theory]
    [InlineData(typeof(Moe.Recipes.TinyMixtral))]
    [InlineData(typeof(Moe.Recipes.Mixtral8x7b))]
    [InlineData(typeof(Moe.Recipes.Mixtral8x22b))]
    public void ShippedRecipes_YieldNoFinding(Type recipe)
    {
        var settings = ((Recipe)Activator.CreateInstance(recipe)!).ToSettings();
        Assert.Empty(RuleSet.Validate(settings));
    }

    [Fact]
    public void ExpertSixteenOn8x22B_MessageShowsArithmeticAndFix()
    {
        var s = RuleCases.Base with { Model = Model.Mixtral8x22B, Parallelism = new Parallelism { Gpus = 32, Tensor = 2, Pipeline = 2, Expert = 16, SequenceParallel = true } };
        var f = Assert.Single(RuleSet.Validate(s), f => f.Rule.Id == DiagnosticIds.ExpertNotDividingExperts);
        Assert.Equal("Expert (16) must divide the 8 experts of Mixtral 8x22B; valid: 1, 2, 4, 8", f.Message);
        Assert.Equal("Parallelism.Expert", f.Fix!.Path);
        Assert.Equal("8", f.Fix.Value);
    }

    [Fact]
    public void SeveralViolations_AreAllReportedAtOnce()
    {
        var s = RuleCases.Base with
        {
            Model = Model.Mixtral8x22B,
            Parallelism = new Parallelism { Gpus = 30, Tensor = 5, Expert = 16, SequenceParallel = false },
            Training = new Training { GlobalBatchSize = 7, MicroBatchSize = 1, Steps = 10 },
        };
        var ids = RuleSet.Validate(s).Select(f => f.Rule.Id).ToHashSet();
        Assert.Superset(new HashSet<string>
        {
            DiagnosticIds.ExpertNotDividingExperts, DiagnosticIds.TensorNotDividingHeads,
            DiagnosticIds.TensorParallelMoeNeedsSequenceParallel, DiagnosticIds.GpusNotDivisibleByExpertParallel,
            DiagnosticIds.GlobalBatchNotDivisible,
        }, ids);
    }

    [Fact]
    public void UnknownSetting_SkipsOnlyTheRulesThatReadIt()
    {
        var s = RuleCases.Base with
        {
            Parallelism = new Parallelism { Gpus = 32, Expert = 3 },
            Router = new Router { TopK = 9 },
            Unknown = ["Parallelism.Expert"],
        };
        var ids = RuleSet.Validate(s).Select(f => f.Rule.Id).ToArray();
        Assert.DoesNotContain(DiagnosticIds.ExpertNotDividingExperts, ids);
        Assert.Contains(DiagnosticIds.TopKOutOfRange, ids);
        Assert.Contains(RuleSet.Deferred(s), d => d.Id == DiagnosticIds.ExpertNotDividingExperts);
    }

    [Fact]
    public void WorldSizeDiffersFromGpus_ReportedAtStartUpOnly()
    {
        Assert.DoesNotContain(RuleSet.Validate(RuleCases.Base), f => f.Rule.Id == DiagnosticIds.WorldSizeMismatch);
        var f = Assert.Single(RuleSet.Validate(RuleCases.Base, new StartUpContext { WorldSize = 16, FileExists = _ => true }),
            f => f.Rule.Id == DiagnosticIds.WorldSizeMismatch);
        Assert.Contains("Gpus = 32 but the launcher started 16 processes", f.Message);
    }

    [Fact]
    public void MissingDataFiles_ReportedAtStartUp()
    {
        var s = RuleCases.Base with { Data = RuleCases.Base.Data with { Prefix = "/nonexistent/sft_text_document" } };
        var findings = RuleSet.Validate(s, new StartUpContext()).Where(f => f.Rule.Id == DiagnosticIds.InputFileMissing).ToArray();
        Assert.Equal(2, findings.Length);
        Assert.Contains(findings, f => f.Message.Contains("/nonexistent/sft_text_document.idx does not exist"));
    }

    [Fact]
    public void TensorParallelOnHopperWithoutMaxConnections_Warns()
    {
        var s = RuleCases.Base with { Parallelism = new Parallelism { Gpus = 32, Tensor = 2, Expert = 8, SequenceParallel = true } };
        var ctx = new StartUpContext { PreBlackwellGpu = true, Environment = _ => null, FileExists = _ => true };
        var f = Assert.Single(RuleSet.Validate(s, ctx), f => f.Rule.Id == DiagnosticIds.CudaDeviceMaxConnections);
        Assert.Equal(RuleSeverity.Warning, f.Rule.DefaultSeverity);
        var set = new StartUpContext { PreBlackwellGpu = true, Environment = n => n == "CUDA_DEVICE_MAX_CONNECTIONS" ? "1" : null, FileExists = _ => true };
        Assert.DoesNotContain(RuleSet.Validate(s, set), f => f.Rule.Id == DiagnosticIds.CudaDeviceMaxConnections);
    }

    [Fact]
    public void RuleIds_AreUniqueAndInTheirCategoryRange()
    {
        Assert.Equal(RuleSet.Descriptors.Count, RuleSet.Descriptors.Select(d => d.Id).Distinct().Count());
        foreach (var d in RuleSet.Descriptors)
        {
            int n = int.Parse(d.Id.Substring(3));
            var (lo, hi) = d.Category switch
            {
                RuleCategory.Topology => (1, 99),
                RuleCategory.RouterAndCapacity => (100, 199),
                RuleCategory.DataAndTraining => (200, 299),
                RuleCategory.Memory => (300, 399),
                _ => (900, 999),
            };
            Assert.InRange(n, lo, hi);
        }
    }

    [Fact]
    public void EveryRule_HasADiagnosticsPageWithInvalidAndFixedExamples()
    {
        foreach (var d in RuleSet.Descriptors)
        {
            string page = Path.Combine(Moe.Tests.TestPaths.RepoRoot, d.HelpPath);
            Assert.True(File.Exists(page), $"{d.Id}: {page} is missing");
            string text = File.ReadAllText(page);
            Assert.Contains("# " + d.Id, text);
            if (d.Category != RuleCategory.StartUp)
            {
                Assert.Contains("## Invalid", text);
                Assert.Contains("## Fixed", text);
            }
        }
    }
}
