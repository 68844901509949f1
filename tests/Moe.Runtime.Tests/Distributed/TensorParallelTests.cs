using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Dsl.Validation;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Commands;
using Moe.Runtime.Tests.Checkpoints;
using Moe.Tests;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using Moe.Runtime.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Distributed;

/// <summary>
/// Tensor and sequence parallel against the one-device run (ParallelEquivalenceTests' TinyMixtral, float32,
/// in-process ranks: losses per step, per-expert counts, and each rank's block of every reduced gradient after step 1
/// within 1e-5 relative), the vocab-parallel pieces against PyTorch's single-device functions, and the run-time
/// refusals of layouts that do not divide the model.
/// </summary>
[Collection("Console")]
public class TensorParallelTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-tp-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static Parallelism TpSp(int gpus, int ep = 1, int? etp = null) =>
        new() { Gpus = gpus, Tensor = 2, SequenceParallel = true, Expert = ep, ExpertTensor = etp };

    [Fact]
    public void TensorParallelWithSequenceParallel_EqualsTheOneDeviceRun() =>
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(TpSp(2)));

    [Fact]
    public void TensorParallelTimesExpertParallel_EqualsTheOneDeviceRun() =>   // TP 2 + SP × EP 2 (ETP = TP = 2) on 4 ranks
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(TpSp(4, ep: 2)));

    [Theory]
    [InlineData(2)]   // TP 2 + SP with EP 2 × ETP 1 on the same two ranks (MoE parallel folding)
    [InlineData(4)]   // the same with data parallel 2
    public void TensorParallelWithWholeExperts_EqualsTheOneDeviceRun(int gpus) =>
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(TpSp(gpus, ep: 2, etp: 1)));

    [Fact]
    public void ExpertTensorParallelWithoutTensorParallel_EqualsTheOneDeviceRun() =>   // ETP 2, TP 1, EP 1: data parallel 2
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 2, ExpertTensor = 2 }));

    [Fact]
    public void TensorParallelWithSeqAuxLossAndZLoss_EqualsTheOneDeviceRun() =>
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(TpSp(2),
            s => s with { Router = s.Router with { LoadBalancing = LoadBalancing.SeqAuxLoss, ZLossCoeff = 1e-3 } }));

    [Fact]
    public void TensorTimesContextParallel_WithZLoss_EqualsTheOneDeviceRun() =>   // TP 2 + SP × CP 2 on 4 ranks: z-loss coefficient ÷ tp_cp once
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(TpSp(4) with { Context = 2 },
            s => s with { Router = s.Router with { ZLossCoeff = 1e-3 } }));

    [Fact]
    public void TensorTimesContextTimesExpertParallel_EqualsTheOneDeviceRun() =>   // TP 2 + SP × CP 2 with EP 2 × ETP 1 folded on 4 ranks
        ParallelEquivalenceTests.AssertEqualsOneDevice(ParallelEquivalenceTests.Tiny(TpSp(4, ep: 2, etp: 1) with { Context = 2 }));

    [Fact]
    public void TensorParallelWithoutSequenceParallel_IsRefusedByRuleAndAtRunTime()
    {
        var s = ParallelEquivalenceTests.Tiny(new Parallelism { Gpus = 2, Tensor = 2 });
        Assert.Contains(RuleSet.Validate(s), f => f.Rule.Id == DiagnosticIds.TensorParallelMoeNeedsSequenceParallel);
        var errors = InProcessJob.Run(new RankLayout(2, 2, 1, 1, 1, 2, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(60),
            rank => Assert.Throws<UserError>(() => new Trainer(s, rank, TextWriter.Null)).Message);
        Assert.All(errors, e => Assert.Contains("Tensor (2) > 1 runs with SequenceParallel = true only", e));
    }

    [Theory]
    [InlineData(999, 4, 2, "The vocabulary (999 tokens) must be a multiple of Tensor (2)")]
    [InlineData(1000, 6, 3, "Tensor (2) must divide the 6 attention heads, and Tensor and the 3 key-value heads must divide one another")]
    public void LayoutNotDividingTheModel_IsAUserErrorNamingTheNumbers(int vocab, int heads, int kvHeads, string expected)
    {
        var config = MixtralConfig.From(Model.TinyMixtral with { VocabSize = vocab, AttentionHeads = heads, KeyValueHeads = kvHeads, HiddenSize = 64 });
        var errors = InProcessJob.Run(new RankLayout(2, 2, 1, 1, 1, 2, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(60), rank =>
        {
            var plan = ParallelPlan.For(rank.Groups, config.Experts, TokenDispatcher.AllToAll, sequenceParallel: true);
            return Assert.Throws<UserError>(() => new MixtralModel(config, new MoeOptions { TopK = 2 }, ScalarType.Float32, CPU, plan)).Message;
        });
        Assert.All(errors, e => Assert.Contains(expected, e));
    }

    [Fact]
    public void SequenceNotDividingUnderOverrides_IsRefusedByRule()
    {
        var s = ParallelEquivalenceTests.Tiny(TpSp(2), s => s with { Data = s.Data with { SequenceLength = 63 } });
        var finding = Assert.Single(RuleSet.Validate(s), f => f.Rule.Id == DiagnosticIds.SequenceNotDivisibleForSequenceParallel);
        Assert.Contains("63", finding.Message);
    }

    /// <summary>
    /// The vocab-parallel embedding and cross-entropy on two ranks against index_select and cross_entropy of the whole
    /// tables on one: the same embedding rows (each rank its positions), the same loss, each rank's columns of the
    /// whole logits' gradient, and the whole logits gathered from the columns.
    /// </summary>
    [Fact]
    public void VocabParallelEmbeddingAndCrossEntropy_EqualTheWholeVocabulary()
    {
        const int vocab = 10, hidden = 3, b = 2, s = 4;
        var generator = new torch.Generator(7);
        var tableVH = torch.randn(vocab, hidden, generator: generator);
        var logitsTV = torch.randn(b * s, vocab, generator: generator);
        var ids = torch.tensor(new long[] { 0, 9, 4, 5, 3, 7, 8, 1 }).view(b, s);
        var targets = torch.tensor(new long[] { 2, 9, -100, 5, 0, 4, 6, 7 });
        var expectedEmbedding = tableVH.index_select(0, ids.flatten()).view(b, s, hidden);
        var wholeLogits = logitsTV.clone().requires_grad_();
        var expectedLoss = nn.functional.cross_entropy(wholeLogits, targets, ignore_index: -100);
        expectedLoss.backward();

        var config = MixtralConfig.From(Model.TinyMixtral with { VocabSize = vocab });
        var results = InProcessJob.Run(new RankLayout(2, 2, 1, 1, 1, 2, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(60), rank =>
        {
            var tp = TensorParallel.For(ParallelPlan.For(rank.Groups, config.Experts, TokenDispatcher.AllToAll, sequenceParallel: true), config);
            int r = tp.Rank;
            var shard = new TorchSharp.Modules.Parameter(tableVH.narrow(0, r * 5, 5).clone());
            var embedded = tp.Embed(shard, ids).detach().clone();
            var local = logitsTV.narrow(1, r * 5, 5).clone().requires_grad_();
            var loss = tp.CrossEntropy(local, targets, -100);
            loss.backward();
            var gathered = tp.GatherVocabulary(local.detach().view(b, s, 5));
            return (r, embedded, loss.item<float>(), local.grad!.clone(), gathered);
        });
        foreach (var (r, embedded, loss, grad, gathered) in results)
        {
            Assert.True(gathered.allclose(logitsTV.view(b, s, vocab), 0, 0), $"rank {r}: logits gathered over the vocabulary");
            Assert.True(embedded.allclose(expectedEmbedding.narrow(1, r * 2, 2), 1e-6, 1e-7), $"rank {r}: embedding of its positions");
            Assert.Equal(expectedLoss.item<float>(), loss, 5);
            Assert.True(grad.allclose(wholeLogits.grad!.narrow(1, r * 5, 5), 1e-5, 1e-7), $"rank {r}: gradient of its vocabulary columns");
        }
    }

    /// <summary>
    /// A checkpoint saved at TP 2 + SP restores at one device, and one saved at one device restores at TP 2: the whole
    /// weights, fp32 main parameters and Adam moments the target holds are bit for bit those the source held (each
    /// placed by index arithmetic independent of the checkpoint code).
    /// </summary>
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void CheckpointOfTensorParallel_RestoresAtAnotherTensorSize_Exactly(bool fromTensorParallel)
    {
        var from = fromTensorParallel ? TpSp(2) : new Parallelism { Gpus = 1 };
        var to = fromTensorParallel ? new Parallelism { Gpus = 1 } : TpSp(2);
        string save = Path.Combine(_dir, "ckpt");
        var saved = Resume.Run(Resume.Tiny(from, steps: 3), save: save, stopAfter: 2);
        var resumed = Resume.Run(Resume.Tiny(to, steps: 3), load: save);
        var before = Resume.WholeState(saved.Select(r => r.AtEnd), "saved");
        var after = Resume.WholeState(resumed.Select(r => r.AtStart), "restored");
        string[] what = ["weights", "main parameters", "exp_avg", "exp_avg_sq"];
        for (int k = 0; k < before.Length; k++) Resume.AssertBitEqual(before[k], after[k], $"TP {from.Tensor} → TP {to.Tensor}: {what[k]}");
        Assert.All(resumed, r => Assert.Equal([3], r.Steps.Select(m => m.Step)));
    }

    /// <summary>
    /// The mixtral-tiny Hugging Face fixture loads into TP 2 ranks' slices (vocabulary rows, key-value groups, head
    /// columns, FFN halves under ETP = TP), is saved as a Moe checkpoint, and exports back to the fixture bit for bit.
    /// </summary>
    [Fact]
    public void HuggingFaceToTensorParallelToHuggingFace_ReturnsTheFixtureBitForBit()
    {
        string fixture = TestPaths.Fixture("mixtral-tiny"), save = Path.Combine(_dir, "roundtrip"), exported = Path.Combine(_dir, "exported");
        var model = new Model
        {
            Name = "mixtral-tiny fixture", HiddenSize = 64, IntermediateSize = 96, Layers = 2, AttentionHeads = 4, KeyValueHeads = 2, Experts = 4,
            ExpertsPerToken = 2, VocabSize = 512, MaxPositionEmbeddings = 256, RouterAuxLossCoef = 0.02,
        };
        var s = Resume.Tiny(TpSp(2)) with { Model = model };
        s = s with { Checkpoint = s.Checkpoint with { Load = fixture } };
        InProcessJob.Run(new RankLayout(2, 2, 1, 1, 1, 2, RankOrder.TpCpEpDpPp), TimeSpan.FromSeconds(120), rank =>
        {
            using var trainer = new Trainer(s, rank, TextWriter.Null);
            CheckpointWriter.Save(trainer, save, 0, TextWriter.Null);
            return 0;
        });
        var (exit, output, err) = ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(), ["checkpoint", "export", save, "--hf", exported]));
        Assert.True(exit == 0, output + err);
        using var ours = SafetensorsFile.Open(Path.Combine(exported, "model.safetensors"));
        using var hub = SafetensorsFile.Open(Path.Combine(fixture, "model.safetensors"));
        Assert.Equal(hub.Entries.Keys.Order(StringComparer.Ordinal), ours.Entries.Keys.Order(StringComparer.Ordinal));
        foreach (var key in hub.Entries.Keys)
        {
            using var a = hub.Read(key);
            using var b = ours.Read(key);
            Assert.True(a.shape.SequenceEqual(b.shape) && a.bytes.SequenceEqual(b.bytes), $"{key} differs");
        }
    }

    [Fact]
    public void BenchWithTensorParallel_ReportsPerGpuThroughputOfOneReplica()
    {
        // TP 2 on two in-process ranks: one data-parallel replica whose 32 tokens a step are shared by 2 GPUs.
        var output = new StringWriter();
        Assert.Equal(0, Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 1, 32, 1, 2, "cpu", Gpus: 2, Tensor: 2), output));
        using var doc = System.Text.Json.JsonDocument.Parse(output.ToString());
        Assert.Equal(2, doc.RootElement.GetProperty("tp").GetInt32());
        Assert.Equal(1, doc.RootElement.GetProperty("dp").GetInt32());
        double step = doc.RootElement.GetProperty("step_s").GetDouble(), perGpu = doc.RootElement.GetProperty("tokens_per_s_per_gpu").GetDouble();
        Assert.Equal(32 / 2 / step, perGpu, 6);
    }

    [Fact]
    public void BenchWithASequenceTensorDoesNotDivide_IsAUserErrorNamingBoth() =>
        Assert.Contains("--seq 33 must be a multiple of --tp 2", Assert.Throws<UserError>(() =>
            Moe.Runtime.Commands.Bench.BenchCommand.Execute(new("tiny", 1, 33, 1, 2, "cpu", Gpus: 2, Tensor: 2), new StringWriter())).Message);
}
