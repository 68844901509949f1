using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.Training;
using Xunit;

namespace Moe.Runtime.Tests.Distributed;

/// <summary>
/// Tensor, pipeline, context and expert parallelism together against the one-device run (ParallelEquivalenceTests'
/// TinyMixtral, float32, in-process ranks: losses per step, per-expert counts and every reduced gradient after step 1
/// within 1e-5 relative): the layouts issue 13 names, which only work when the pieces compose.
/// </summary>
[Collection("Console")]
public class CombinedParallelTests
{
    [Fact]
    public void TensorTimesPipelineParallel_EqualsTheOneDeviceRun() =>   // TP 2 + SP × PP 2 on 4 ranks, z-loss on (coefficient ÷ TP in the stages)
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(
            new Parallelism { Gpus = 4, Tensor = 2, SequenceParallel = true, Pipeline = 2 },
            s => s with { Router = s.Router with { ZLossCoeff = 1e-2 } }));

    [Fact]
    public void TensorPipelineAndExpertParallel_OnEightRanks_EqualsTheOneDeviceRun() =>   // TP 2 + SP + PP 2 + EP 2 (ETP = TP) on 8 ranks
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(
            new Parallelism { Gpus = 8, Tensor = 2, SequenceParallel = true, Pipeline = 2, Expert = 2 }));

    [Fact]
    public void PipelineTimesContextParallel_IsAUserErrorNamingBoth()
    {
        var s = ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 4, Pipeline = 2, Context = 2 });
        var p = s.Parallelism;
        var errors = InProcessJob.Run(new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order), TimeSpan.FromSeconds(60),
            rank => Assert.Throws<UserError>(() => new Trainer(s, rank, TextWriter.Null)).Message);
        Assert.All(errors, e => Assert.Contains("Pipeline (2) × Context (2) parallel does not run yet", e));
    }
}
