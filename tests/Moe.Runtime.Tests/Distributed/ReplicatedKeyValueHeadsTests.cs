using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Dsl.Validation;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Commands;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using Moe.Runtime.Tests.Checkpoints;
using Moe.Runtime.Training;
using Moe.Tests;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Distributed;

/// <summary>
/// Tensor parallel beyond the key-value heads (Megatron R017: TP a multiple of Nkv, each rank one replicated group)
/// against the one-device run — TinyMixtral (4 heads) in float32 on in-process ranks: losses and gradient norms per
/// step, per-expert counts, and each rank's elements of every reduced gradient after step 1 within 1e-5 relative —
/// checkpoints that reshard between TP 4 and one device bit for bit (replicas of a group's k/v rows equal on every
/// rank), a Hugging Face model through TP 4 and back, and the layouts still refused.
/// </summary>
[Collection("Console")]
public class ReplicatedKeyValueHeadsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-kvrep-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static Parallelism TpSp(int tp, int gpus = 0) => new() { Gpus = gpus == 0 ? tp : gpus, Tensor = tp, SequenceParallel = true };

    private static RecipeSettings Tiny(int tp, int keyValueHeads, int steps = 3, int gpus = 0) =>
        Resume.Tiny(TpSp(tp, gpus), steps) with { Model = Model.TinyMixtral with { Layers = 2, KeyValueHeads = keyValueHeads } };

    [Theory]
    [InlineData(2, 1, 2)]   // both ranks hold the one key-value head, each with 2 query heads
    [InlineData(4, 2, 4)]   // ranks 0-1 hold group 0, ranks 2-3 group 1, one query head each
    [InlineData(4, 1, 4)]   // all four ranks hold the one group
    [InlineData(2, 1, 4)]   // TP 2 × DP 2 with the distributed optimizer: the shared rows' optimizer shards on both replicas
    public void TensorParallelBeyondTheKeyValueHeads_EqualsTheOneDeviceRun(int tp, int keyValueHeads, int gpus)
    {
        var s = Tiny(tp, keyValueHeads, gpus: gpus);
        Assert.True(s.Training.DistributedOptimizer);
        Assert.DoesNotContain(RuleSet.Validate(s), f => f.Rule.Id is DiagnosticIds.TensorIncompatibleWithKeyValueHeads or DiagnosticIds.TensorNotDividingHeads);
        var (one, ranks) = ParallelEquivalenceTests.AssertEqualsOneDevice(s);
        // The replicated k/v rows are counted once in the norm (clipping at 1.0 would otherwise change the updates too).
        foreach (var run in ranks)
            for (int i = 0; i < one.Steps.Length; i++)
                Assert.True(Math.Abs(one.Steps[i].GradNorm - run.Steps[i].GradNorm) <= 1e-5 * one.Steps[i].GradNorm,
                    $"gradient norm of step {i + 1}: {run.Steps[i].GradNorm:R} vs one device {one.Steps[i].GradNorm:R}");
    }

    /// <summary>
    /// A checkpoint saved at TP 4 with two key-value heads restores at one device and one saved at one device restores
    /// at TP 4: the whole weights, fp32 main parameters and Adam moments are bit for bit the source's (placed by index
    /// arithmetic independent of the checkpoint code, which also requires the replicas of each group's k/v rows to be
    /// bit-equal on the ranks that share it), and training continues.
    /// </summary>
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void CheckpointWithReplicatedKeyValueHeads_RestoresAtAnotherTensorSize_Exactly(bool fromTensorParallel)
    {
        var from = Tiny(fromTensorParallel ? 4 : 1, 2);
        var to = Tiny(fromTensorParallel ? 1 : 4, 2);
        string save = Path.Combine(_dir, "ckpt");
        var saved = Resume.Run(from, save: save, stopAfter: 2);
        var resumed = Resume.Run(to, load: save);
        var before = Resume.WholeState(saved.Select(r => r.AtEnd), "saved");
        var after = Resume.WholeState(resumed.Select(r => r.AtStart), "restored");
        string[] what = ["weights", "main parameters", "exp_avg", "exp_avg_sq"];
        for (int k = 0; k < before.Length; k++) Resume.AssertBitEqual(before[k], after[k], $"TP {from.Parallelism.Tensor} → TP {to.Parallelism.Tensor}: {what[k]}");
        Assert.All(resumed, r => Assert.Equal([3], r.Steps.Select(m => m.Step)));
        if (fromTensorParallel)
        {
            // Each group's k/v rows were written once (by the group's first rank): no overlap, nothing missing.
            Assert.Empty(CheckpointInspector.Verify(CheckpointInspector.Open(save)));
        }
    }

    /// <summary>
    /// The mixtral-tiny Hugging Face fixture (4 heads, 2 key-value heads) loads into TP 4 ranks (each its query head and
    /// its group's k/v rows), is saved as a Moe checkpoint and exports back to the fixture bit for bit.
    /// </summary>
    [Fact]
    public void HuggingFaceToTensorParallelFourToHuggingFace_ReturnsTheFixtureBitForBit()
    {
        string fixture = TestPaths.Fixture("mixtral-tiny"), save = Path.Combine(_dir, "roundtrip"), exported = Path.Combine(_dir, "exported");
        var model = new Model
        {
            Name = "mixtral-tiny fixture", HiddenSize = 64, IntermediateSize = 96, Layers = 2, AttentionHeads = 4, KeyValueHeads = 2, Experts = 4,
            ExpertsPerToken = 2, VocabSize = 512, MaxPositionEmbeddings = 256, RouterAuxLossCoef = 0.02,
        };
        var s = Resume.Tiny(TpSp(4)) with { Model = model };
        s = s with { Checkpoint = s.Checkpoint with { Load = fixture } };
        var heads = InProcessJob.Run(new RankLayout(4, 4, 1, 1, 1, 4, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(120), rank =>
        {
            using var trainer = new Trainer(s, rank, TextWriter.Null);
            CheckpointWriter.Save(trainer, save, 0, TextWriter.Null);
            // This rank's k rows of layer 0 against the fixture's rows of group rank / 2, read here without the adapter.
            using var hub = SafetensorsFile.Open(Path.Combine(fixture, "model.safetensors"));
            using var k = hub.Read("model.layers.0.self_attn.k_proj.weight");
            var a = trainer.Model.Layers[0].SelfAttention;
            var mine = a.GroupedView(a.Qkv.detach()).select(1, a.QueryHeadsPerGroup).reshape(16, 64);
            return mine.allclose(k.narrow(0, rank.Groups.Coordinates.Tp / 2 * 16, 16).to(mine.dtype), 0, 0);
        });
        Assert.All(heads, Assert.True);
        var (exit, output, err) = ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(), ["checkpoint", "export", save, "--hf", exported]));
        Assert.True(exit == 0, output + err);
        using var ours = SafetensorsFile.Open(Path.Combine(exported, "model.safetensors"));
        using var theirs = SafetensorsFile.Open(Path.Combine(fixture, "model.safetensors"));
        Assert.Equal(theirs.Entries.Keys.Order(StringComparer.Ordinal), ours.Entries.Keys.Order(StringComparer.Ordinal));
        foreach (var key in theirs.Entries.Keys)
        {
            using var a = theirs.Read(key);
            using var b = ours.Read(key);
            Assert.True(a.shape.SequenceEqual(b.shape) && a.bytes.SequenceEqual(b.bytes), $"{key} differs");
        }
    }

    /// <summary>
    /// <c>--simulate</c> shrinks Mixtral 8x7B (32 heads, 8 key-value heads) but keeps the key-value heads when Tensor
    /// exceeds them, so the simulation replicates them as the job will; below 8 it keeps one group per tensor rank.
    /// </summary>
    [Theory]
    [InlineData(16, 32, 8)]
    [InlineData(2, 8, 2)]
    public void SimulationOfTensorBeyondTheKeyValueHeads_KeepsThemReplicated(int tp, int heads, int keyValueHeads)
    {
        var s = ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = tp, Tensor = tp, SequenceParallel = true, Expert = 1 }) with { Model = Model.Mixtral8x7B };
        var m = SimulationPlan.For(s, dataExists: true).Settings.Model;
        Assert.Equal((heads, keyValueHeads), (m.AttentionHeads, m.KeyValueHeads));
        Assert.DoesNotContain(RuleSet.Validate(s with { Model = m }), f => f.Rule.Id is DiagnosticIds.TensorIncompatibleWithKeyValueHeads or DiagnosticIds.TensorNotDividingHeads);
    }

    [Theory]
    [InlineData(6, 12, 4, 96, 1002, "Tensor (6) must divide the 12 attention heads, and Tensor and the 4 key-value heads must divide one another", "1, 2, 4, 12")]   // TP > Nkv, not a multiple
    [InlineData(4, 6, 2, 96, 1000, "Tensor (4) must divide the 6 attention heads, and Tensor and the 2 key-value heads must divide one another", "1, 2, 6")]      // TP a multiple of Nkv, heads not divisible
    public void LayoutThatCannotReplicateTheKeyValueHeads_IsRefusedByRuleAndAtRunTime(int tp, int heads, int keyValueHeads, int hidden, int vocab, string expected, string valid)
    {
        var m = Model.TinyMixtral with { AttentionHeads = heads, KeyValueHeads = keyValueHeads, HiddenSize = hidden, VocabSize = vocab };
        var s = ParallelEquivalenceTests.Tiny(TpSp(tp)) with { Model = m };
        Assert.Contains(RuleSet.Validate(s), f => f.Rule.Id is DiagnosticIds.TensorIncompatibleWithKeyValueHeads or DiagnosticIds.TensorNotDividingHeads);
        var config = MixtralConfig.From(m);
        var errors = InProcessJob.Run(new RankLayout(tp, tp, 1, 1, 1, tp, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(60), rank =>
        {
            var plan = ParallelPlan.For(rank.Groups, config.Experts, TokenDispatcher.AllToAll, sequenceParallel: true);
            return Assert.Throws<UserError>(() => new MixtralModel(config, new MoeOptions { TopK = 2 }, ScalarType.Float32, CPU, plan)).Message;
        });
        Assert.All(errors, e => Assert.Contains(expected, e));
        Assert.All(errors, e => Assert.Contains($"choose Tensor among {valid}", e));
        // The attention alone (what a decoder layer builds) refuses it the same way.
        Assert.Contains(expected, Assert.Throws<UserError>(() => new Attention(config, ScalarType.Float32, CPU, tp)).Message);
    }
}
