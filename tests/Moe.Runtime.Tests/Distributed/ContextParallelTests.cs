using Moe.Dsl;
using Moe.Runtime.Distributed;
using Moe.Runtime.Modeling;
using TorchSharp;
using Xunit;
using static Moe.Runtime.Tests.Distributed.ParallelEquivalenceTests;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Distributed;

/// <summary>
/// Context parallel: Megatron's load-balanced chunks (get_batch_on_this_cp_rank), the mask over the gathered keys,
/// the sequence rule at run time, and every layout against the one-device run of the same global batch and
/// micro-batch size (losses per step and reduced gradients after a step, ≤ 1e-5 relative).
/// </summary>
[Collection("Console")]
public class ContextParallelTests
{
    [Fact]
    public void ChunkIndices_GiveEachRankChunkRAndItsMirror()
    {
        // S = 16, CP = 2: four chunks of 4; rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2.
        Assert.Equal([0L, 1, 2, 3, 12, 13, 14, 15], ContextParallel.ChunkIndices(16, 2, 0));
        Assert.Equal([4L, 5, 6, 7, 8, 9, 10, 11], ContextParallel.ChunkIndices(16, 2, 1));
        // CP = 4, S = 8: chunks of one token; rank r keeps r and 7 − r.
        Assert.Equal([[0L, 7], [1L, 6], [2L, 5], [3L, 4]], Enumerable.Range(0, 4).Select(r => ContextParallel.ChunkIndices(8, 4, r)).ToArray());
        Assert.Equal(Enumerable.Range(0, 6).Select(i => (long)i), ContextParallel.ChunkIndices(6, 1, 0));
    }

    [Theory]
    [InlineData(66, 2, "66", "4", "64 or 68")]
    [InlineData(3, 2, "3", "4", "to 4")]
    public void SequenceNotDivisibleByTwiceContext_ThrowsUserErrorNamingTheNumbers(int sequence, int cp, string seqText, string multiple, string fix)
    {
        var e = Assert.Throws<UserError>(() => ContextParallel.CheckSequence(sequence, cp));
        Assert.StartsWith("MOE0206", e.Message);
        Assert.Contains($"({seqText} tokens)", e.Message);
        Assert.Contains($"2 × Context = {multiple}", e.Message);
        Assert.Contains(fix, e.Message);
    }

    [Fact]
    public void SequenceChangedAfterValidation_TrainerRefusesIt()
    {
        // Validation ran on 64 tokens; a sequence set afterwards (as an override could) is refused where it is cut.
        var s = Tiny(new Parallelism { Gpus = 2, Context = 2 });
        s = s with { Data = s.Data with { SequenceLength = 66 } };
        var error = Assert.Throws<UserError>(() => Train(s));
        Assert.Contains("(66 tokens) must be a multiple of 2 × Context = 4", error.Message);
    }

    [Theory]
    [InlineData(null, false)]
    [InlineData(5, true)]
    public void AttentionMask_IsTheWholeSequenceMaskAtGlobalPositions(int? window, bool documents)
    {
        // Independent check: the one-device masks (tested against transformers) indexed by this rank's query
        // positions and the gathered key positions.
        const int s = 16, cp = 2, b = 2;
        var documentsBS = torch.tensor(new long[] { 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6 }).view(b, s);
        var wholeBSS = documents ? MixtralModel.DocumentCausalMask(documentsBS).squeeze(1) : torch.ones(s, s, dtype: ScalarType.Bool).tril().expand(b, s, s);
        if (window is int w) wholeBSS = wholeBSS & MixtralModel.SlidingWindowCausalMask(s, w);
        var layout = new Dsl.Layout.RankLayout(cp, 1, 1, cp, 1, 1, Dsl.Layout.RankOrder.TpCpEpDpPp);
        var masks = Runtime.Distributed.InProcess.InProcessJob.Run(layout, TimeSpan.FromSeconds(60), rank =>
        {
            var context = new ContextParallel(rank.Groups.Cp);
            var mine = context.Shard(documentsBS);
            return (context.Rank, context.AttentionMask(s / cp, documents ? mine : null, window, CPU).DetachFromDisposeScope(), context.LocalIndices(s), context.GatheredIndices(s));
        });
        foreach (var (r, mask, queries, keys) in masks)
        {
            var expected = wholeBSS.index_select(1, torch.tensor(queries)).index_select(2, torch.tensor(keys));
            var actual = mask.expand(b, 1, s / cp, s).squeeze(1);
            Assert.Equal(expected.shape, actual.shape);
            Assert.True(actual.eq(expected).all().item<bool>(), $"rank {r}");
        }
    }

    private static RecipeSettings Packed(RecipeSettings s, int? window) =>
        s with { Model = s.Model with { SlidingWindow = window }, Data = s.Data with { ResetAttentionMask = true, ResetPositionIds = true, EodMaskLoss = true } };

    [Fact]
    public void ContextParallel2_EqualsTheOneDeviceRun() =>
        AssertEqualsOneDevice(Tiny(new Parallelism { Gpus = 2, Context = 2 }, s => s with { Data = s.Data with { ResetAttentionMask = false, ResetPositionIds = false } }));

    [Fact]
    public void ContextParallel2WithPackedDocumentsAndSlidingWindow_EqualsTheOneDeviceRun() =>
        AssertEqualsOneDevice(Tiny(new Parallelism { Gpus = 2, Context = 2 }, s => Packed(s, window: 24)));

    [Theory]
    [InlineData(4)]   // CP 2 × DP 2, EP 2: expert DP 2
    [InlineData(2)]   // CP 2 folded onto EP 2: the two cp ranks are the two expert ranks, expert DP 1
    public void ContextParallel2WithExpertParallel2_EqualsTheOneDeviceRun(int gpus) =>
        AssertEqualsOneDevice(Tiny(new Parallelism { Gpus = gpus, Context = 2, Expert = 2 }, s => Packed(s, window: null)));

    [Theory]
    [InlineData(LoadBalancing.SeqAuxLoss, null)]
    [InlineData(LoadBalancing.GlobalAuxLoss, 1e-3)]
    public void ContextParallel2WithOtherLoadBalancingAndZLoss_EqualsTheOneDeviceRun(LoadBalancing balancing, double? zLoss) =>
        AssertEqualsOneDevice(Tiny(new Parallelism { Gpus = 2, Context = 2 }, s => s with { Router = s.Router with { LoadBalancing = balancing, ZLossCoeff = zLoss } }));

    [Fact]
    public void BenchOnCpu_ContextParallel2_ReportsPerGpuThroughputOfTheSharedSequences()
    {
        var output = new StringWriter();
        Assert.Equal(0, Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 1, 32, 1, 2, "cpu", Gpus: 2, Context: 2), output));
        using var doc = System.Text.Json.JsonDocument.Parse(output.ToString());
        Assert.Equal(2, doc.RootElement.GetProperty("cp").GetInt32());
        Assert.Equal(1, doc.RootElement.GetProperty("dp").GetInt32());
        double step = doc.RootElement.GetProperty("step_s").GetDouble(), perGpu = doc.RootElement.GetProperty("tokens_per_s_per_gpu").GetDouble();
        Assert.Equal(32 / 2 / step, perGpu, 6);   // one 32-token sequence shared by the two GPUs of the cp group
    }

    [Fact]
    public void BenchWithSequenceNotDivisibleByTwiceContext_NamesSeq()
    {
        var e = Assert.Throws<UserError>(() => Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 1, 30, 1, 2, "cpu", Gpus: 2, Context: 2), new StringWriter()));
        Assert.Contains("(30 tokens) must be a multiple of 2 × Context = 4", e.Message);
        Assert.Contains("Set --seq to 28 or 32", e.Message);
    }

    [Fact]
    public void ValidationLossAtContextParallel2_EqualsTheOneDeviceLoss()
    {
        static double[] ValidationLoss(RecipeSettings s)
        {
            var p = s.Parallelism;
            var layout = new Dsl.Layout.RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);
            return Runtime.Distributed.InProcess.InProcessJob.Run(layout, TimeSpan.FromSeconds(120), rank =>
            {
                using var validation = new Moe.Runtime.Training.IndexedSampleSource(s, s.Model.EosTokenId, split: 1, samples: Moe.Runtime.Training.Evaluator.SampleCount(s));
                using var trainer = new Moe.Runtime.Training.Trainer(s, rank, TextWriter.Null);
                return new Moe.Runtime.Training.Evaluator(trainer.Model, validation, s, rank).Loss();
            });
        }
        var one = ValidationLoss(Tiny(new Parallelism { Gpus = 1 })).Single();
        var ranks = ValidationLoss(Tiny(new Parallelism { Gpus = 2, Context = 2 }, s => Packed(s, window: 24)));
        var oneWindowed = ValidationLoss(Tiny(new Parallelism { Gpus = 1 }, s => Packed(s, window: 24))).Single();
        Assert.NotEqual(one, oneWindowed);   // the window matters on these samples
        foreach (var loss in ranks) Assert.True(Math.Abs(loss - oneWindowed) <= 1e-5 * oneWindowed, $"{loss:R} vs one device {oneWindowed:R}");
    }
}
