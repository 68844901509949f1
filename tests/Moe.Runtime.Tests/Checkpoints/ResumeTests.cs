using Moe.Dsl;
using Moe.Runtime.Training;
using Xunit;
using static Moe.Runtime.Tests.Checkpoints.Resume;

namespace Moe.Runtime.Tests.Checkpoints;

/// <summary>
/// Exact resume (TinyMixtral in float32, in-process ranks): 10 steps saved at step 5 and resumed give steps 6–10
/// bit-identical to the uninterrupted run at the same layout — losses, gradient norms, expert counts and final weights —
/// and resumed at another layout, the restored weights and optimizer state equal the saved ones element for element and
/// the losses equal the uninterrupted run within 1e-5 relative.
/// </summary>
[Collection("Console")]
public class ResumeTests : IClassFixture<ResumeTests.OneDevice>, IDisposable
{
    /// <summary>The uninterrupted one-device run of 10 steps, shared by the tests of this class.</summary>
    public sealed class OneDevice
    {
        internal RankRun Run { get; } = Resume.Run(Tiny(Layout(1))).Single();
    }

    private readonly OneDevice _reference;
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-resume-").FullName;

    public ResumeTests(OneDevice reference) => _reference = reference;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static void AssertSameSteps(IReadOnlyList<StepMetrics> expected, IReadOnlyList<StepMetrics> actual, string what)
    {
        Assert.Equal(expected.Select(m => m.Step), actual.Select(m => m.Step));
        for (int i = 0; i < expected.Count; i++)
        {
            var (e, a) = (expected[i], actual[i]);
            Assert.True(e.Loss == a.Loss && e.LmLoss == a.LmLoss && e.AuxLoss == a.AuxLoss && e.GradNorm == a.GradNorm && e.Lr == a.Lr,
                $"{what}, step {e.Step}: loss {a.Loss:R} lm {a.LmLoss:R} grad {a.GradNorm:R} lr {a.Lr:R}, uninterrupted {e.Loss:R} {e.LmLoss:R} {e.GradNorm:R} {e.Lr:R}");
            Assert.Equal(e.TokensPerExpert, a.TokensPerExpert);
        }
    }

    [Fact]
    public void OneDevice_SavedAtStep5AndResumed_StepsSixToTenAreBitIdentical()
    {
        var first = Run(Tiny(Layout(1)), save: _dir, stopAfter: 5).Single();
        AssertSameSteps(_reference.Run.Steps[..5], first.Steps, "before the save");
        var resumed = Run(Tiny(Layout(1)), load: _dir).Single();
        AssertSameSteps(_reference.Run.Steps[5..], resumed.Steps, "resumed");
        Assert.Contains($"resumed from {Path.Combine(_dir, "iter_0000005")}: iteration 5 done, 40 samples consumed; continuing at step 6 of 10", resumed.Log);
        var expected = WholeState([_reference.Run.AtEnd], "uninterrupted");
        var actual = WholeState([resumed.AtEnd], "resumed");
        for (int k = 0; k < expected.Length; k++) AssertBitEqual(expected[k], actual[k], "final state");
    }

    [Fact]
    public void ExpertParallelTimesDataParallel_SavedAtStep5AndResumed_StepsSixToTenAreBitIdentical()
    {
        var s = Tiny(Layout(4, ep: 2));   // EP 2 × DP 4 over 4 ranks, expert DP 2
        var uninterrupted = Run(s);
        Run(s, save: _dir, stopAfter: 5);
        var resumed = Run(s, load: _dir);
        for (int r = 0; r < 4; r++) AssertSameSteps(uninterrupted[r].Steps[5..], resumed[r].Steps, $"rank {r}");
        var expected = WholeState(uninterrupted.Select(r => r.AtEnd), "uninterrupted");
        var actual = WholeState(resumed.Select(r => r.AtEnd), "resumed");
        for (int k = 0; k < expected.Length; k++) AssertBitEqual(expected[k], actual[k], "final state");
    }

    public static TheoryData<int, int, int?, int, int, int?> Reshardings() => new()
    {
        { 2, 2, null, 4, 4, null },   // EP 2 → EP 4 (and 2 → 4 ranks)
        { 2, 1, null, 1, 1, null },   // DP 2 → DP 1 (one device)
        { 4, 2, 2, 2, 2, null },      // EP 2 × ETP 2 → EP 2 (ETP 2 → 1, 4 → 2 ranks)
    };

    [Theory]
    [MemberData(nameof(Reshardings))]
    public void AnotherLayout_RestoresTheSavedStateExactly_AndContinuesTheUninterruptedLosses(int gpus, int ep, int? etp, int toGpus, int toEp, int? toEtp)
    {
        var saved = Run(Tiny(Layout(gpus, ep, etp)), save: _dir, stopAfter: 5);
        var resumed = Run(Tiny(Layout(toGpus, toEp, toEtp)), load: _dir);

        // Weights, fp32 main parameters and both moments: what the target layout restored is what the source layout held.
        var before = WholeState(saved.Select(r => r.AtEnd), "saved");
        var after = WholeState(resumed.Select(r => r.AtStart), "restored");
        string[] what = ["weights", "main parameters", "exp_avg", "exp_avg_sq"];
        for (int k = 0; k < before.Length; k++) AssertBitEqual(before[k], after[k], $"{gpus} → {toGpus} ranks: {what[k]}");

        foreach (var (run, r) in resumed.Select((run, r) => (run, r)))
        {
            Assert.Equal(Enumerable.Range(6, 5), run.Steps.Select(m => m.Step));
            foreach (var (m, e) in run.Steps.Zip(_reference.Run.Steps[5..]))
                Assert.True(Math.Abs(m.Loss - e.Loss) <= 1e-5 * Math.Abs(e.Loss), $"rank {r}, step {m.Step}: loss {m.Loss:R}, uninterrupted one device {e.Loss:R}");
        }
        Assert.Contains("resharded from", resumed[0].Log);
    }
}
