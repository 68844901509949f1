using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using Moe.Runtime.Training;
using TorchSharp;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Distributed;

/// <summary>
/// Training.OverlapGradReduce (Megatron's --overlap-grad-reduce), float32 on the CPU with in-process ranks:
/// the expert buckets' reductions start inside the last micro-batch's backward, in bucket order, and give the
/// gradients, losses and parameters of the setting off.
/// </summary>
[Collection("Console")]
public class OverlapGradReduceTests
{
    // ---- The buffer on its own: two layers of grouped experts, one bucket per weight, data parallel 2 ----

    private const int Hidden = 16, Ffn = 32, ExpertCount = 4, Rows = 8, MicroBatches = 2;

    /// <summary>Layer 1 routes rows to every expert; layer 2 sends none to expert 2.</summary>
    private static readonly long[] Counts1 = [3, 2, 1, 2], Counts2 = [2, 3, 0, 3];

    /// <summary>A bucket's start as the buffer told it: index, during the backward, and whether backward() had returned.</summary>
    private sealed record Start(int Bucket, bool DuringBackward, bool BackwardReturned, int MicroBatch);

    private sealed record BufferRun(Tensor MainGrad, (long Start, long Length)[] Shards, long[] Offsets, List<Start> Starts);

    /// <summary>The experts' weights, the same on every rank.</summary>
    private static (Tensor GateUp1, Tensor Down1, Tensor GateUp2, Tensor Down2) Weights()
    {
        var gen = new torch.Generator(7);
        return (torch.randn(ExpertCount, 2 * Ffn, Hidden, generator: gen) * 0.2, torch.randn(ExpertCount, Hidden, Ffn, generator: gen) * 0.2,
            torch.randn(ExpertCount, 2 * Ffn, Hidden, generator: gen) * 0.2, torch.randn(ExpertCount, Hidden, Ffn, generator: gen) * 0.2);
    }

    /// <summary>Rank r's micro-batch m: rows and the weights of a linear loss on the second layer's output (none with <paramref name="empty"/>).</summary>
    private static (Tensor X, Tensor W) Data(int rank, int micro, bool empty)
    {
        var gen = new torch.Generator((ulong)(100 + 10 * rank + micro));
        var x = torch.randn(Rows, Hidden, generator: gen);
        var w = torch.randn(Rows, Hidden, generator: gen);
        return empty ? (x.narrow(0, 0, 0), w.narrow(0, 0, 0)) : (x, w);
    }

    private static Experts NewExperts(Tensor gateUp, Tensor down, bool loop)
    {
        var e = new Experts(ExpertCount, Hidden, Ffn, ScalarType.Float32, CPU) { ForceLoop = loop };
        using (torch.no_grad())
        {
            e.GateUp.copy_(gateUp);
            e.Down.copy_(down);
        }
        return e;
    }

    /// <summary>
    /// One step of two micro-batches on each of two data-parallel ranks through a gradient buffer, as the trainer runs it;
    /// <paramref name="emptyLastOnRank1"/>: rank 1's last micro-batch routes no row to its experts at all.
    /// </summary>
    private static BufferRun[] RunBuffers(bool overlap, bool sharded, bool loopLayer2 = false, bool emptyLastOnRank1 = false)
    {
        var (gu1, d1, gu2, d2) = Weights();
        return InProcessJob.Run(new RankLayout(2, 1, 1, 1, 1, 1, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(60), rank =>
        {
            using var e1 = NewExperts(gu1, d1, loop: false);
            using var e2 = NewExperts(gu2, d2, loop: loopLayer2);
            // Backward order: layer 2's weights first, down before gate_up (the order the grouped backward writes them).
            var parameters = new List<(string, Parameter, bool, bool)>
            {
                ("l2.down", e2.Down, true, true), ("l2.gate_up", e2.GateUp, true, true), ("l1.down", e1.Down, true, true), ("l1.gate_up", e1.GateUp, true, true),
            };
            // A bucket size of one element: every weight is a bucket of its own.
            using var buffer = new GradientBuffer("expert", parameters, rank.Groups.Dp, 1, 0.5, direct: true, overlap: overlap);
            Assert.Equal(4, buffer.Buckets.Count);
            if (buffer.Direct)
            {
                e1.Sinks = new ExpertGradientSinks(buffer.SinkOf(e1.GateUp), buffer.SinkOf(e1.Down));
                e2.Sinks = new ExpertGradientSinks(buffer.SinkOf(e2.GateUp), buffer.SinkOf(e2.Down));
            }
            var starts = new List<Start>();
            int micro = 0;
            bool returned = false;
            buffer.BucketStarted += (b, during) => starts.Add(new Start(b.Index, during, returned, micro));
            buffer.BindGradients();
            for (micro = 0; micro < MicroBatches; micro++)
            {
                using var scope = torch.NewDisposeScope();
                bool empty = emptyLastOnRank1 && rank.Groups.Dp.Rank == 1 && micro == MicroBatches - 1;
                var (x, w) = Data(rank.Groups.Dp.Rank, micro, empty);
                var c1 = empty ? torch.zeros(ExpertCount, dtype: ScalarType.Int64) : torch.tensor(Counts1);
                var c2 = empty ? torch.zeros(ExpertCount, dtype: ScalarType.Int64) : torch.tensor(Counts2);
                var loss = (e2.Forward(e1.Forward(x, c1), c2) * w).sum() / MicroBatches;
                returned = false;
                if (micro == MicroBatches - 1) buffer.BeginLastMicroBatch(sharded);
                loss.backward();
                returned = true;
                ManagedBackward.Complete();
                buffer.AccumulateMicroBatch();
            }
            micro = -1;   // after the micro-batches
            buffer.Reduce(sharded);
            e1.Sinks = e2.Sinks = ExpertGradientSinks.None;
            return new BufferRun(buffer.MainGrad.clone(), buffer.Buckets.Select(buffer.Shard).ToArray(),
                buffer.Entries.Select(e => e.Offset).ToArray(), starts);
        });
    }

    /// <summary>
    /// The independent reference: plain autograd through the per-expert loop over both ranks' micro-batches, each loss
    /// scaled by 1/DP as the buffer pre-scales, in one thread: the four reduced gradients in the buffer's order.
    /// </summary>
    private static Tensor[] Reference(bool emptyLastOnRank1 = false)
    {
        var (gu1, d1, gu2, d2) = Weights();
        using var e1 = NewExperts(gu1, d1, loop: true);
        using var e2 = NewExperts(gu2, d2, loop: true);
        for (int r = 0; r < 2; r++)
            for (int m = 0; m < MicroBatches; m++)
            {
                if (emptyLastOnRank1 && r == 1 && m == MicroBatches - 1) continue;   // no rows, no gradient
                var (x, w) = Data(r, m, empty: false);
                var loss = (e2.Forward(e1.Forward(x, torch.tensor(Counts1)), torch.tensor(Counts2)) * w).sum() / MicroBatches * 0.5;
                loss.backward();
            }
        return [e2.Down.grad!.clone(), e2.GateUp.grad!.clone(), e1.Down.grad!.clone(), e1.GateUp.grad!.clone()];
    }

    private static void AssertMatchesReference(BufferRun run, Tensor[] reference, bool sharded, string what)
    {
        var expected = torch.cat(reference.Select(t => t.flatten()).ToArray());
        // Each weight is its own bucket, padded to a multiple of 2: lay the reference out the same way.
        var laidOut = torch.zeros_like(run.MainGrad);
        long at = 0;
        for (int i = 0; i < reference.Length; i++)
        {
            laidOut.narrow(0, run.Offsets[i], reference[i].NumberOfElements).copy_(expected.narrow(0, at, reference[i].NumberOfElements));
            at += reference[i].NumberOfElements;
        }
        foreach (var (start, length) in sharded ? run.Shards : [(0L, run.MainGrad.shape[0])])
        {
            var a = run.MainGrad.narrow(0, start, length);
            var e = laidOut.narrow(0, start, length);
            double error = (a - e).norm().item<float>(), scale = e.norm().item<float>();
            Assert.True(error <= 1e-5 * scale, $"{what}: reduced gradient [{start}, +{length}) off the reference by {error / scale:E2} relative");
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void LastMicroBatch_StartsEveryExpertBucketBeforeBackwardReturns_InBucketOrder(bool sharded)
    {
        var runs = RunBuffers(overlap: true, sharded);
        foreach (var (run, r) in runs.Select((run, r) => (run, r)))
        {
            Assert.Equal([0, 1, 2, 3], run.Starts.Select(s => s.Bucket));
            Assert.All(run.Starts, s =>
            {
                Assert.True(s.DuringBackward, $"rank {r}: bucket {s.Bucket} was started after the backward");
                Assert.False(s.BackwardReturned, $"rank {r}: bucket {s.Bucket} was started after backward() returned");
                Assert.Equal(MicroBatches - 1, s.MicroBatch);
            });
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Overlap_GivesTheGradientsOfTheSettingOff_BitForBit_AndTheReference(bool sharded)
    {
        var on = RunBuffers(overlap: true, sharded);
        var off = RunBuffers(overlap: false, sharded);
        var reference = Reference();
        for (int r = 0; r < 2; r++)
        {
            Assert.DoesNotContain(off[r].Starts, s => s.DuringBackward);
            var region = sharded ? on[r].Shards : [(0L, on[r].MainGrad.shape[0])];
            foreach (var (start, length) in region)
                Assert.True(on[r].MainGrad.narrow(0, start, length).equal(off[r].MainGrad.narrow(0, start, length)).all().item<bool>(),
                    $"rank {r}: reduced gradients [{start}, +{length}) differ with overlap on");
            AssertMatchesReference(on[r], reference, sharded, $"rank {r}");
        }
    }

    [Fact]
    public void ExpertWithoutTokens_ItsBucketIsStillReduced_AndItsGradientIsZero()
    {
        var runs = RunBuffers(overlap: true, sharded: false);
        var reference = Reference();
        foreach (var run in runs)
        {
            // Layer 2's down weight (bucket 0) holds expert 2, which received no row: its block is exactly zero, and the bucket was reduced.
            Assert.Contains(run.Starts, s => s.Bucket == 0 && s.DuringBackward);
            var down2 = run.MainGrad.narrow(0, run.Offsets[0], ExpertCount * Hidden * Ffn).view(ExpertCount, Hidden, Ffn);
            Assert.Equal(0f, down2[2].abs().max().item<float>());
            Assert.True(down2[1].abs().max().item<float>() > 0, "expert 1 received rows; its gradient cannot be zero");
            AssertMatchesReference(run, reference, sharded: false, "rank");
        }
    }

    [Fact]
    public void RankWhoseExpertsGetNoRowInTheLastMicroBatch_StillReducesEveryBucket()
    {
        var runs = RunBuffers(overlap: true, sharded: true, emptyLastOnRank1: true);
        var reference = Reference(emptyLastOnRank1: true);
        foreach (var (run, r) in runs.Select((run, r) => (run, r)))
        {
            Assert.Equal([0, 1, 2, 3], run.Starts.Select(s => s.Bucket));
            AssertMatchesReference(run, reference, sharded: true, $"rank {r}");
        }
        // Both ranks start every bucket inside the backward: the grouped experts' backward runs (and writes zeros into
        // the sinks) for a rank that received no row, so readiness — and the group's order of operations — is the same
        // on every rank of the group.
        Assert.All(runs, run => Assert.All(run.Starts, s => Assert.True(s.DuringBackward)));
    }

    [Fact]
    public void BucketNotReadyDuringTheBackward_HoldsTheLaterOnes_AndIsReducedAfterIt()
    {
        // Layer 2 on the per-expert loop: its gradients come through autograd's .grad, not a sink, so bucket 0 is never
        // ready in the backward; the buckets behind it wait, and Reduce starts all four in order.
        var on = RunBuffers(overlap: true, sharded: true, loopLayer2: true);
        var off = RunBuffers(overlap: false, sharded: true, loopLayer2: true);
        var reference = Reference();
        for (int r = 0; r < 2; r++)
        {
            Assert.Equal([0, 1, 2, 3], on[r].Starts.Select(s => s.Bucket));
            Assert.All(on[r].Starts, s => Assert.False(s.DuringBackward));
            foreach (var (start, length) in on[r].Shards)
                Assert.True(on[r].MainGrad.narrow(0, start, length).equal(off[r].MainGrad.narrow(0, start, length)).all().item<bool>());
            AssertMatchesReference(on[r], reference, sharded: true, $"rank {r}");
        }
    }

    // ---- The trainer: three steps of TinyMixtral, setting on against setting off ----

    private sealed record TrainerRun(double[] Losses, double[] GradNorms, Dictionary<string, Tensor> Parameters, int StartedInBackward, int Started);

    private static TrainerRun[] Train(RecipeSettings s)
    {
        var p = s.Parallelism;
        var layout = new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);
        return InProcessJob.Run(layout, TimeSpan.FromSeconds(120), rank =>
        {
            using var source = new IndexedSampleSource(s, s.Model.EosTokenId);
            using var trainer = new Trainer(s, rank, TextWriter.Null);
            int during = 0, all = 0;
            foreach (var buffer in trainer.Buffers.Where(b => b.Name == "expert"))
                buffer.BucketStarted += (_, inBackward) => { all++; if (inBackward) during++; };
            var result = trainer.Run(source, new TrainingObservers([]));
            var parameters = trainer.Parameters.ToDictionary(x => x.Name, x => x.Parameter.detach().clone());
            return new TrainerRun(result.Steps.Select(m => m.Loss).ToArray(), result.Steps.Select(m => m.GradNorm).ToArray(), parameters, during, all);
        });
    }

    private static RecipeSettings Overlap(RecipeSettings s, bool on) => s with { Training = s.Training with { OverlapGradReduce = on } };

    [Theory]
    [InlineData(2, 1, true)]    // DP 2, distributed optimizer (reduce-scatter)
    [InlineData(2, 1, false)]   // DP 2, all-reduce
    [InlineData(4, 2, true)]    // DP 4 × EP 2: expert data parallel 2
    public void Trainer_WithOverlap_EqualsTheSettingOff_AfterThreeSteps(int gpus, int ep, bool distributedOptimizer) =>
        AssertOverlapEqualsOff(ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = gpus, Expert = ep },
            x => x with { Training = x.Training with { DistributedOptimizer = distributedOptimizer } }));

    [Fact]
    public void Trainer_WithOverlapUnderPipelineParallel_EqualsTheSettingOff_AfterThreeSteps() =>
        // DP 2 × PP 2 (1F1B, one layer a stage): each stage's buckets start inside its last backward of the step.
        AssertOverlapEqualsOff(ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 4, Pipeline = 2 }));

    private static void AssertOverlapEqualsOff(RecipeSettings s)
    {
        int gpus = s.Parallelism.Gpus;
        var off = Train(Overlap(s, false));
        var on = Train(Overlap(s, true));
        for (int r = 0; r < gpus; r++)
        {
            Assert.Equal(3, on[r].Losses.Length);
            Assert.Equal(off[r].Losses, on[r].Losses);        // bit-equal: the same sums in the same order
            Assert.Equal(off[r].GradNorms, on[r].GradNorms);
            foreach (var (name, value) in off[r].Parameters)
                Assert.True(value.equal(on[r].Parameters[name]).all().item<bool>(), $"rank {r}: {name} differs after 3 steps with overlap on");
            // The overlap path ran: TinyMixtral's experts are one bucket, started inside each step's last backward.
            Assert.Equal(0, off[r].StartedInBackward);
            Assert.Equal(3, on[r].StartedInBackward);
            Assert.Equal(3, on[r].Started);
        }
    }

    [Fact]
    public void ExpertDataParallelSharingTheTensorParallelCommunicator_IsRefusedWithANote()
    {
        // TP 2 with ETP 1 on 2 GPUs: expert data parallel and tensor parallel are the same two ranks, one communicator.
        var s = Overlap(ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 2, Tensor = 2, ExpertTensor = 1, SequenceParallel = true },
            x => x with { Training = x.Training with { Steps = 1 } }), true);
        var p = s.Parallelism;
        var layout = new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);
        var notes = InProcessJob.Run(layout, TimeSpan.FromSeconds(60), rank =>
        {
            var log = new StringWriter();
            using var trainer = new Trainer(s, rank, log);
            Assert.All(trainer.Buffers, b => Assert.False(b.OverlapGradReduce));
            return log.ToString();
        });
        Assert.Contains("Training.OverlapGradReduce is off for this layout", notes[0]);
        Assert.Contains("shares its communicator with the tp group", notes[0]);
    }

    [Fact]
    public void Trainer_WithOverlapUnderAVirtualPipeline_EqualsTheSettingOff_AfterThreeSteps() =>
        // DP 2 × PP 2 with two model chunks a stage: the stage's one expert bucket holds both chunks' experts and is
        // ready in chunk 0's last backward, after chunk 1's window has had its gradients.
        AssertOverlapEqualsOff(ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 4, Pipeline = 2, VirtualPipeline = 2 },
            x => x with { Model = x.Model with { Layers = 4 } }));

    [Fact]
    public void Bench_WithOverlapGradReduce_RunsAndSaysSo()
    {
        var output = new StringWriter();
        Assert.Equal(0, Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 2, 32, 1, 1, "cpu", Gpus: 2, MicroBatches: 2, OverlapGradReduce: true), output));
        using var doc = System.Text.Json.JsonDocument.Parse(output.ToString());
        Assert.True(doc.RootElement.GetProperty("overlap_grad_reduce").GetBoolean());
        Assert.Equal(2, doc.RootElement.GetProperty("dp").GetInt32());
    }

    [Fact]
    public void Bench_WithOverlapGradReduceWithoutMainGrads_IsAUserError()
    {
        var e = Assert.Throws<UserError>(() => Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 2, 32, 1, 1, "cpu", MainGrads: false, OverlapGradReduce: true), TextWriter.Null));
        Assert.Contains("--overlap-grad-reduce", e.Message);
    }

    [Fact]
    public void CommandLine_OverlapGradReduce_OverridesTheRecipe()
    {
        var recipe = ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 2 });
        var options = new Moe.Runtime.Commands.RecipeOptions(recipe);
        var command = new System.CommandLine.RootCommand();
        options.AddTo(command);
        Assert.False(options.Apply(recipe, command.Parse([])).Training.OverlapGradReduce);
        Assert.True(options.Apply(recipe, command.Parse(["--overlap-grad-reduce"])).Training.OverlapGradReduce);
        // A recipe that turns it on: the default follows the recipe, and the command line can turn it off.
        var on = Overlap(recipe, true);
        var onOptions = new Moe.Runtime.Commands.RecipeOptions(on);
        var onCommand = new System.CommandLine.RootCommand();
        onOptions.AddTo(onCommand);
        Assert.True(onOptions.Apply(on, onCommand.Parse([])).Training.OverlapGradReduce);
        Assert.False(onOptions.Apply(on, onCommand.Parse(["--overlap-grad-reduce", "false"])).Training.OverlapGradReduce);
    }

    // ---- The asynchronous collectives of the in-process backend ----

    private static T[] OnRanks<T>(int size, Func<Moe.Runtime.Distributed.Communicator, T> body) => InProcessCommunicatorTests.OnRanks(size, body);

    [Fact]
    public void AsyncCollectives_GiveTheSynchronousResults_InCallOrderAmongTheOthers()
    {
        // Rank r: [1, 2, 3, 4]·(r + 1). Reduce-scatter sum [3, 6, 9, 12] → rank 0 [3, 6], rank 1 [9, 12]; then a synchronous
        // all-reduce of [r] → [1]; then an async all-reduce of [10·(r + 1)] → [30]. Each takes its place in the group's order.
        var results = OnRanks(2, c =>
        {
            var input = torch.tensor(new float[] { 1, 2, 3, 4 }) * (c.Rank + 1);
            var output = torch.zeros(2);
            var rs = c.ReduceScatterAsync(input, output);
            var mid = torch.tensor(new float[] { c.Rank });
            c.AllReduce(mid);
            var last = torch.tensor(new float[] { 10 * (c.Rank + 1) });
            var ar = c.AllReduceAsync(last);
            rs.Wait();
            ar.Wait();
            ar.Wait();   // idempotent
            return (output.data<float>().ToArray(), mid.item<float>(), last.item<float>(), c.Recent.Select(x => x.Operation).ToArray());
        });
        Assert.Equal(new float[] { 3, 6 }, results[0].Item1);
        Assert.Equal(new float[] { 9, 12 }, results[1].Item1);
        Assert.All(results, r =>
        {
            Assert.Equal(1f, r.Item2);
            Assert.Equal(30f, r.Item3);
            Assert.Equal(["reduce_scatter", "all_reduce", "all_reduce"], r.Item4);
        });
    }

    [Fact]
    public void AsyncCollectiveIssuedOutOfOrderOnOneRank_IsReportedAsAMismatch()
    {
        // Rank 0 starts the reduce-scatter first, rank 1 the all-reduce first: operation #1 differs across members.
        var e = Assert.ThrowsAny<Exception>(() => OnRanks(2, c =>
        {
            var input = torch.ones(4);
            var output = torch.zeros(2);
            var one = torch.ones(1);
            if (c.Rank == 0) { c.ReduceScatterAsync(input, output); c.AllReduce(one); }
            else { c.AllReduce(one); c.ReduceScatterAsync(input, output); }
            return 0;
        }));
        Assert.Contains("does not match across members", e.Message);
    }
}

