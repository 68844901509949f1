using Moe.Dsl;
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
    public void PipelineTimesContextParallel_EqualsTheOneDeviceRun() =>   // PP 2 × CP 2 on 4 ranks, z-loss on (aux scale CP/M, coefficient ÷ cp)
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(
            new Parallelism { Gpus = 4, Pipeline = 2, Context = 2 },
            s => s with { Router = s.Router with { ZLossCoeff = 1e-2 } }));

    [Fact]
    public void PipelineContextTensorAndExpertParallel_OnEightRanks_EqualsTheOneDeviceRun() =>   // PP 2 × CP 2 × TP 2 + SP, EP 2 × ETP 1 folded
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(
            new Parallelism { Gpus = 8, Pipeline = 2, Context = 2, Tensor = 2, SequenceParallel = true, Expert = 2, ExpertTensor = 1 }));
}
