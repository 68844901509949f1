using System.Text.Json;
using System.Text.Json.Nodes;
using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Commands;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.Modeling;
using Moe.Runtime.Training;
using Moe.Tests;
using TorchSharp;
using Xunit;
using static Moe.Runtime.Tests.Checkpoints.Resume;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Checkpoints;

/// <summary>The Moe checkpoint format: what a save writes and where, the Hugging Face round trip, inspect and export, and bad input.</summary>
[Collection("Console")]
public class CheckpointFormatTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-ckptfmt-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Dir(string name) => Path.Combine(_dir, name);

    private static (int Exit, string Out, string Err) Moe(params string[] args) => ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(), args));

    private static JsonNode Metadata(string iteration) => JsonNode.Parse(File.ReadAllText(Path.Combine(iteration, "metadata.json")))!;

    [Fact]
    public void Save_WritesRankFilesMetadataAndPointer_AndNothingElse()
    {
        string save = Dir("save");
        Run(Tiny(Layout(1)), save: save, stopAfter: 2);
        Assert.Equal("2", File.ReadAllText(Path.Combine(save, "latest_checkpointed_iteration.txt")));
        Assert.Equal(["iter_0000002", "latest_checkpointed_iteration.txt"], Directory.GetFileSystemEntries(save).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        string iter = Path.Combine(save, "iter_0000002");
        Assert.Equal(["metadata.json", "rank_00000.safetensors"], Directory.GetFileSystemEntries(iter).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        var m = Metadata(iter);
        Assert.Equal("moe-checkpoint", (string?)m["format"]);
        Assert.Equal(1, (int?)m["format_version"]);
        Assert.Equal(2, (int?)m["iteration"]);
        Assert.Equal(16, (long?)m["consumed_samples"]);            // 2 steps × global batch 8
        Assert.Equal(16, (long?)m["data"]!["next_sample"]);
        Assert.Equal(80, (long?)m["data"]!["train_samples"]);       // 10 steps × 8: the dataset's shuffle depends on it
        Assert.Equal(2, (int?)m["optimizer"]!["step"]);
        Assert.Equal(1234, (int?)m["settings"]!["Training.Seed"]);
        Assert.Null(m["settings"]!["Capacity.Factor"]);
        Assert.Equal("AllToAll", (string?)m["settings"]!["Dispatcher"]);
        Assert.Equal(1, (int?)m["layout"]!["gpus"]);
        Assert.Equal(2, (int?)m["model_config"]!["num_hidden_layers"]);
        var file = m["files"]!.AsArray().Single()!;
        Assert.Equal(new FileInfo(Path.Combine(iter, "rank_00000.safetensors")).Length, (long?)file["bytes"]);
        // TinyMixtral's experts: gate_up [4, 2, 128, 64] = 65,536 elements, held whole by the one rank.
        var main = m["tensors"]!.AsArray().Single(t => (string?)t!["kind"] == "main" && (string?)t!["key"] == "model.layers.0.mlp.experts.gate_up")!;
        Assert.Equal("[4,2,128,64]", main["global_shape"]!.ToJsonString());
        Assert.Equal((0L, 65536L), ((long)main["start"]!, (long)main["end"]!));
        var w1 = m["tensors"]!.AsArray().Single(t => (string?)t!["key"] == "model.layers.1.block_sparse_moe.experts.3.w1.weight")!;
        Assert.Equal("[128,64]", w1["global_shape"]!.ToJsonString());
        using var f = SafetensorsFile.Open(Path.Combine(iter, "rank_00000.safetensors"));
        Assert.Equal("pt", f.Metadata["format"]);
        Assert.True(f.Metadata.ContainsKey("moe.blocks"));
        Assert.Equal([128L, 64L], f.Entry("model.layers.1.block_sparse_moe.experts.3.w1.weight").Shape);
        Assert.Equal([65536L], f.Entry("optimizer.exp_avg_sq.model.layers.0.mlp.experts.gate_up").Shape);
    }

    [Fact]
    public void ExpertParallelTimesDataParallel_WritesEachBlockOnce_FromTheRankThatOwnsIt()
    {
        string save = Dir("ep");
        Run(Tiny(Layout(4, ep: 2)), save: save, stopAfter: 1);
        var tensors = Metadata(Path.Combine(save, "iter_0000001"))["tensors"]!.AsArray();
        var weights = tensors.Where(t => (string?)t!["kind"] == "weight").ToList();
        // Every hub tensor once. Order tp-cp-ep-dp: rank = ep + 2·dp. Dense weights come from data-parallel rank 0 (rank 0);
        // experts 0–1 live on EP rank 0 and 2–3 on EP rank 1, each written by expert-data-parallel rank 0: ranks 0 and 1.
        Assert.Equal(weights.Count, weights.Select(t => (string?)t!["key"]).Distinct().Count());
        Assert.Equal(2 + 2 * (4 * 3 + 7) + 1, weights.Count);
        string FileOf(string key) => (string)weights.Single(t => (string?)t!["key"] == key)!["file"]!;
        Assert.Equal("rank_00000.safetensors", FileOf("model.embed_tokens.weight"));
        Assert.Equal("rank_00000.safetensors", FileOf("model.layers.1.block_sparse_moe.experts.1.w2.weight"));
        Assert.Equal("rank_00001.safetensors", FileOf("model.layers.1.block_sparse_moe.experts.2.w2.weight"));
        // The distributed optimizer shards each buffer over its group. Dense, in backward order: lm_head 64,000, norm 64, per
        // layer gate 256 + norm 64 + o 4,096 + qkv 8,192 + norm 64, embedding 64,000 = 153,408 over DP 4 = 38,352 each, so
        // lm_head is rank 0's [0, 38352) and rank 1's [38352, 64000). Experts over expert DP 2: layer 1's down (2·64·128 =
        // 16,384) and gate_up (32,768) make the first half, layer 0's the second (expert-DP rank 1: ranks 2 and 3).
        var mains = tensors.Where(t => (string?)t!["kind"] == "main").ToList();
        string Blocks(string key) => string.Join(" ", mains.Where(t => (string?)t!["key"] == key)
            .Select(t => $"{t!["file"]}:{string.Join(",", t["offsets"]!.AsArray().Select(o => (long)o!))}:{t["start"]}-{t["end"]}").Order(StringComparer.Ordinal));
        Assert.Equal("rank_00000.safetensors:0,0:0-38352 rank_00001.safetensors:0,0:38352-64000", Blocks("lm_head"));
        Assert.Equal("rank_00002.safetensors:0,0,0:0-16384 rank_00003.safetensors:2,0,0:0-16384", Blocks("model.layers.0.mlp.experts.down"));
        var (exit, output, err) = Moe("checkpoint", "inspect", save);
        Assert.True(exit == 0, output + err);
        Assert.Contains("integrity: ok", output);
        Assert.Contains("4 GPUs (TP 1 · CP 1 · PP 1, EP 2 · ETP 1; DP 4, expert DP 2, distributed optimizer)", output);
    }

    private static Model FixtureModel => new()
    {
        Name = "mixtral-tiny fixture", HiddenSize = 64, IntermediateSize = 96, Layers = 2, AttentionHeads = 4, KeyValueHeads = 2, Experts = 4,
        ExpertsPerToken = 2, VocabSize = 512, MaxPositionEmbeddings = 256, RouterAuxLossCoef = 0.02,
    };

    [Theory]
    [InlineData(1, 1, null)]
    [InlineData(4, 2, 2)]   // EP 2 × ETP 2: each rank holds two experts' halves of the FFN
    public void HuggingFaceToMoeToHuggingFace_ReturnsTheFixtureBitForBit(int gpus, int ep, int? etp)
    {
        string fixture = TestPaths.Fixture("mixtral-tiny"), save = Dir("roundtrip"), exported = Dir("exported");
        var s = Tiny(Layout(gpus, ep, etp)) with { Model = FixtureModel };
        s = s with { Checkpoint = s.Checkpoint with { Load = fixture } };
        var p = s.Parallelism;
        var logs = InProcessJob.Run(new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order), TimeSpan.FromSeconds(120), rank =>
        {
            var log = new StringWriter();
            using var trainer = new Trainer(s, rank, log);
            CheckpointWriter.Save(trainer, save, 0, log);
            return log.ToString();
        });
        Assert.Contains("weights only", logs[0]);
        var (exit, output, err) = Moe("checkpoint", "export", save, "--hf", exported);
        Assert.True(exit == 0, output + err);
        using (var ours = SafetensorsFile.Open(Path.Combine(exported, "model.safetensors")))
        using (var hub = SafetensorsFile.Open(Path.Combine(fixture, "model.safetensors")))
        {
            Assert.Equal(hub.Entries.Keys.Order(StringComparer.Ordinal), ours.Entries.Keys.Order(StringComparer.Ordinal));
            foreach (var key in hub.Entries.Keys)
            {
                using var a = hub.Read(key);
                using var b = ours.Read(key);
                Assert.Equal(a.dtype, b.dtype);
                Assert.True(a.shape.SequenceEqual(b.shape) && a.bytes.SequenceEqual(b.bytes), $"{key} differs");
            }
        }
        var (c, f) = (MixtralConfig.Load(Path.Combine(exported, "config.json")), MixtralConfig.Load(Path.Combine(fixture, "config.json")));
        Assert.Equal((f.VocabSize, f.HiddenSize, f.IntermediateSize, f.Layers, f.Heads, f.KeyValueHeads, f.HeadDim, f.Experts, f.TopK),
            (c.VocabSize, c.HiddenSize, c.IntermediateSize, c.Layers, c.Heads, c.KeyValueHeads, c.HeadDim, c.Experts, c.TopK));
        Assert.Equal((f.RopeTheta, f.RmsNormEps, f.RouterAuxLossCoef, f.MaxPositionEmbeddings), (c.RopeTheta, c.RmsNormEps, c.RouterAuxLossCoef, c.MaxPositionEmbeddings));
        // Every field transformers wrote as a float is a float literal in ours too (its strict config refuses an int).
        using (var hubJson = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(fixture, "config.json"))))
        using (var ourJson = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(exported, "config.json"))))
        {
            var floats = hubJson.RootElement.EnumerateObject()
                .Where(p => p.Value.ValueKind == System.Text.Json.JsonValueKind.Number && p.Value.GetRawText().IndexOfAny(['.', 'e', 'E']) >= 0)
                .Select(p => p.Name).ToList();
            Assert.Contains("router_jitter_noise", floats);
            foreach (var name in floats)
                Assert.True(ourJson.RootElement.TryGetProperty(name, out var v) && v.GetRawText().IndexOfAny(['.', 'e', 'E']) >= 0,
                    $"{name} is not written as a float: {(ourJson.RootElement.TryGetProperty(name, out var w) ? w.GetRawText() : "missing")}");
        }
        using var reloaded = MixtralStateDictAdapter.LoadModel(exported, ScalarType.Float32, CPU);
        Assert.Empty(Directory.GetDirectories(_dir, ".*"));
    }

    [Fact]
    public void HuggingFaceFolderOfAnotherModel_NamesEveryDifferentField()
    {
        var s = Tiny(Layout(1));   // TinyMixtral: vocabulary 1000, FFN 128, 4096 positions, aux coefficient 0.02
        var e = LoadFails(s, TestPaths.Fixture("mixtral-tiny"));
        Assert.Contains("describes another model than the recipe's Tiny Mixtral: vocab_size 512 ≠ Model.VocabSize 1000, intermediate_size 96 ≠ Model.IntermediateSize 128", e.Message);
        var fixture = s with { Model = FixtureModel with { MaxPositionEmbeddings = 4096 } };
        e = LoadFails(fixture, TestPaths.Fixture("mixtral-tiny"));
        Assert.Contains("max_position_embeddings 256 ≠ Model.MaxPositionEmbeddings 4096", e.Message);
        Assert.Contains("--allow-changed Model.MaxPositionEmbeddings", e.Message);
    }

    [Fact]
    public void HubShapes_AreTheHubTensorsOfAWholeModel()
    {
        var config = MixtralConfig.Load(Path.Combine(TestPaths.Fixture("mixtral-tiny"), "config.json"));
        using var model = new MixtralModel(config, new() { TopK = 2 }, ScalarType.Float32, CPU);
        var tensors = MixtralStateDictAdapter.HubTensors(model);
        Assert.Equal(tensors.Select(h => h.Key), MixtralStateDictAdapter.HubShapes(config).Select(e => e.Key));
        Assert.Equal(tensors.Select(h => string.Join(",", h.BlockShape)), MixtralStateDictAdapter.HubShapes(config).Select(e => string.Join(",", e.Shape)));
    }

    private string SavedAtStep(int step, Parallelism? layout = null)
    {
        string save = Dir("s" + Guid.NewGuid().ToString("N")[..6]);
        Run(Tiny(layout ?? Layout(1)), save: save, stopAfter: step);
        return save;
    }

    private static UserError LoadFails(RecipeSettings s, string load, CheckpointLoadOptions? options = null)
    {
        var e = Assert.ThrowsAny<Exception>(() => Run(s, load: load, options: options));
        return Assert.IsType<UserError>(e);
    }

    [Fact]
    public void TruncatedShard_IsNamedWithBothSizes_AndInspectFails()
    {
        string save = SavedAtStep(1);
        string file = Path.Combine(save, "iter_0000001", "rank_00000.safetensors");
        long size = new FileInfo(file).Length;
        using (var fs = new FileStream(file, FileMode.Open)) fs.SetLength(size - 100);
        var e = LoadFails(Tiny(Layout(1)), save);
        Assert.Contains($"{file} has {size - 100} bytes but metadata.json records {size}: the file is truncated", e.Message);
        var (exit, _, err) = Moe("checkpoint", "inspect", save);
        Assert.Equal(2, exit);
        Assert.Contains("truncated", err);
    }

    [Fact]
    public void MissingShard_IsNamed()
    {
        string save = SavedAtStep(1, Layout(2, ep: 2));
        File.Delete(Path.Combine(save, "iter_0000001", "rank_00001.safetensors"));
        var e = LoadFails(Tiny(Layout(1)), save);
        Assert.Contains("rank_00001.safetensors is missing: metadata.json lists it", e.Message);
        Assert.Contains("written by rank 1", e.Message);
    }

    [Fact]
    public void AnotherModel_NamesEveryDifferentField()
    {
        string save = SavedAtStep(1);
        var other = Tiny(Layout(1)) with { Model = Model.TinyMixtral with { Layers = 3, Experts = 8, VocabSize = 1024 } };
        var e = LoadFails(other, save);
        Assert.Contains("the checkpoint holds another model", e.Message);
        Assert.Contains("Model.Layers (2 → 3)", e.Message);
        Assert.Contains("Model.Experts (4 → 8)", e.Message);
        Assert.Contains("Model.VocabSize (1000 → 1024)", e.Message);
    }

    [Fact]
    public void ChangedDynamics_AreRefusedByName_UnlessAllowed()
    {
        string save = SavedAtStep(1);
        var changed = Tiny(Layout(1)) with { Capacity = new Capacity { Factor = 1.0, DropPolicy = DropPolicy.Position } };
        changed = changed with { Training = changed.Training with { Seed = 7 } };
        var e = LoadFails(changed, save);
        Assert.Contains("Training.Seed (1234 → 7)", e.Message);
        Assert.Contains("Capacity.Factor (null → 1)", e.Message);
        Assert.Contains("Capacity.DropPolicy (\"Probs\" → \"Position\")", e.Message);
        Assert.Contains("--allow-changed Capacity.DropPolicy,Capacity.Factor,Training.Seed", e.Message);

        var run = Run(changed, load: save, stopAfter: 2, options: CheckpointLoadOptions.Parse(["seed,capacity"])).Single();
        Assert.Equal(2, run.Steps[0].Step);
        Assert.Contains("note: Training.Seed changed from the checkpoint's 1234 to 7 (allowed by --allow-changed)", run.Log);

        var typo = LoadFails(changed, save, CheckpointLoadOptions.Parse(["sed"]));
        Assert.Contains("--allow-changed sed: no setting of that name", typo.Message);
        var shape = LoadFails(changed, save, CheckpointLoadOptions.Parse(["Model.Experts"]));
        Assert.Contains("fixes the shapes", shape.Message);
    }

    [Fact]
    public void PointerToAMissingIteration_SaysWhatIsThere()
    {
        string save = SavedAtStep(1);
        File.WriteAllText(Path.Combine(save, "latest_checkpointed_iteration.txt"), "7");
        var e = LoadFails(Tiny(Layout(1)), save);
        Assert.Contains("names iteration 7, but", e.Message);
        Assert.Contains("its complete iterations are iter_0000001", e.Message);
    }

    [Fact]
    public void NewerFormatVersion_IsRefused()
    {
        string save = SavedAtStep(1);
        string path = Path.Combine(save, "iter_0000001", "metadata.json");
        var m = Metadata(Path.GetDirectoryName(path)!);
        m["format_version"] = 2;
        File.WriteAllText(path, m.ToJsonString());
        var e = LoadFails(Tiny(Layout(1)), save);
        Assert.Contains("written in Moe checkpoint format version 2; this build reads versions up to 1", e.Message);
    }

    /// <summary>A disk that fills: writes fail once <paramref name="room"/> bytes are written.</summary>
    private sealed class FullDisk(long room) : CheckpointStorage
    {
        public override Stream Create(string path) => new Filling(base.Create(path), room);

        private sealed class Filling(Stream inner, long room) : Stream
        {
            private long _written;
            public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));
            public override void Write(ReadOnlySpan<byte> buffer)
            {
                if (_written + buffer.Length > room) throw new IOException("No space left on device");
                _written += buffer.Length;
                inner.Write(buffer);
            }
            public override void Flush() => inner.Flush();
            protected override void Dispose(bool disposing)
            {
                if (disposing) inner.Dispose();
                base.Dispose(disposing);
            }
            public override bool CanRead => false;
            public override bool CanSeek => false;
            public override bool CanWrite => true;
            public override long Length => _written;
            public override long Position { get => _written; set => throw new NotSupportedException(); }
            public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
            public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
            public override void SetLength(long value) => throw new NotSupportedException();
        }
    }

    [Fact]
    public void DiskFillingDuringASave_KeepsThePreviousCheckpoint_AndEveryRankSaysSo()
    {
        string save = SavedAtStep(1, Layout(2, ep: 2));
        // Resume at EP 2; the save after step 2 fails on rank 1 only, a few kilobytes into its file.
        var e = Assert.IsType<UserError>(Assert.ThrowsAny<Exception>(() =>
            Run(Tiny(Layout(2, ep: 2)), load: save, save: save, stopAfter: 2, storage: rank => rank == 1 ? new FullDisk(4096) : null)));
        Assert.Contains($"Saving iteration 2 to {save} failed (rank 1: No space left on device); nothing of this save was kept.", e.Message);
        Assert.Contains($"The previous checkpoint {Path.Combine(save, "iter_0000001")} is intact and {Path.Combine(save, "latest_checkpointed_iteration.txt")} still names it", e.Message);
        Assert.Equal("1", File.ReadAllText(Path.Combine(save, "latest_checkpointed_iteration.txt")));
        Assert.Equal(["iter_0000001", "latest_checkpointed_iteration.txt"], Directory.GetFileSystemEntries(save).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        var resumed = Run(Tiny(Layout(2, ep: 2)), load: save, stopAfter: null);
        Assert.Equal(2, resumed[0].Steps[0].Step);
    }

    [Fact]
    public void InterruptedSaves_NeverBecomeLatest_AndAreCleanedByTheNextSave()
    {
        string save = SavedAtStep(2);
        // What a save killed mid-way leaves: a temporary folder with a partial file, and an iteration folder without metadata.
        Directory.CreateDirectory(Path.Combine(save, ".iter_0000004.incomplete"));
        File.WriteAllBytes(Path.Combine(save, ".iter_0000004.incomplete", "rank_00000.safetensors"), new byte[100]);
        Directory.CreateDirectory(Path.Combine(save, "iter_0000006"));
        var run = Run(Tiny(Layout(1)), load: save, save: save, stopAfter: 3).Single();
        Assert.Equal(3, run.Steps.Single().Step);
        Assert.False(Directory.Exists(Path.Combine(save, ".iter_0000004.incomplete")));
        Assert.Equal("3", File.ReadAllText(Path.Combine(save, "latest_checkpointed_iteration.txt")));
        var e = Assert.Throws<UserError>(() => CheckpointSource.Resolve(Path.Combine(save, "iter_0000006")));
        Assert.Contains("has no metadata.json", e.Message);
    }

    [Fact]
    public void ReusedSaveFolder_MovesThePointerBackOnlySayingSo()
    {
        string save = SavedAtStep(4);
        var run = Run(Tiny(Layout(1)), save: save, stopAfter: 2).Single();
        Assert.Contains("named iteration 4, written by an earlier run into this save folder; it now names this run's 2", run.Log);
        Assert.Equal("2", File.ReadAllText(Path.Combine(save, "latest_checkpointed_iteration.txt")));
        Assert.True(Directory.Exists(Path.Combine(save, "iter_0000004")));
    }

    [Fact]
    public void KeepLast_KeepsTheNewestCheckpoints()
    {
        string save = Dir("keep");
        var s = Tiny(Layout(1), steps: 10);
        s = s with { Checkpoint = s.Checkpoint with { Save = save, Interval = 1, KeepLast = 2 } };
        using var source = new IndexedSampleSource(s, s.Model.EosTokenId);
        using var metrics = new MetricsWriter(null);
        using var trainer = new Trainer(s, CPU, TextWriter.Null);
        var log = new StringWriter();
        var schedule = new CheckpointSchedule(trainer, null, log);
        trainer.Run(source, metrics, step =>
        {
            schedule.AfterStep(step);
            if (step == 4) trainer.StopRequested = true;
        });
        Assert.Equal(["iter_0000003", "iter_0000004", "latest_checkpointed_iteration.txt"], Directory.GetFileSystemEntries(save).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        Assert.Contains("removed iter_0000002 (--keep-last 2)", log.ToString());
    }
}
