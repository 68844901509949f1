using Moe.Runtime;
using System.Text;
using System.Text.Json;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Commands;
using Moe.Runtime.Modeling;
using Moe.Tests;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>config.json, the safetensors reader and writer, and the Hugging Face model round trip.</summary>
public class CheckpointTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-ckpt-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static string Fixture => TestPaths.Fixture("mixtral-tiny");

    private string WriteConfig(string json)
    {
        string path = Path.Combine(_dir, "config.json");
        File.WriteAllText(path, json);
        return path;
    }

    private const string Minimal = "\"vocab_size\": 100, \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, " +
        "\"num_attention_heads\": 4, \"num_local_experts\": 4, \"num_experts_per_tok\": 2";

    [Fact]
    public void MinimalConfig_TakesTransformersDefaults()
    {
        var c = MixtralConfig.Load(WriteConfig("{" + Minimal + "}"));
        // configuration_mixtral.py: head_dim = hidden/heads, kv heads = heads, theta 1e6, eps 1e-5,
        // aux coef 0.001, 4096·32 positions, no sliding window, silu, bos/eos 1/2.
        Assert.Equal((16, 4, 1e6, 1e-5, 0.001, 131072, (int?)null), (c.HeadDim, c.KeyValueHeads, c.RopeTheta, c.RmsNormEps, c.RouterAuxLossCoef, c.MaxPositionEmbeddings, c.SlidingWindow));
        Assert.Equal(("silu", 0.0, (int?)1, (int?)2, 0.02, false), (c.HiddenAct, c.AttentionDropout, c.BosTokenId, c.EosTokenId, c.InitializerRange, c.TieWordEmbeddings));
    }

    [Fact]
    public void RopeParametersOnly_GiveTheta()
    {
        var c = MixtralConfig.Load(WriteConfig("{" + Minimal + ", \"rope_parameters\": {\"rope_theta\": 10000.0, \"rope_type\": \"default\"}}"));
        Assert.Equal(10000.0, c.RopeTheta);
    }

    [Fact]
    public void FixtureConfig_ReadsEveryField()
    {
        var c = MixtralConfig.Load(Path.Combine(Fixture, "config.json"));
        Assert.Equal((512, 64, 96, 2, 4, 2, 16, 4, 2), (c.VocabSize, c.HiddenSize, c.IntermediateSize, c.Layers, c.Heads, c.KeyValueHeads, c.HeadDim, c.Experts, c.TopK));
        Assert.Equal((1e6, 1e-5, 0.02, 256, true), (c.RopeTheta, c.RmsNormEps, c.RouterAuxLossCoef, c.MaxPositionEmbeddings, c.OutputRouterLogits));
    }

    [Theory]
    [InlineData("\"hidden_act\": \"gelu\"", "hidden_act is \"gelu\"")]
    [InlineData("\"attention_dropout\": 0.1", "attention_dropout is 0.1")]
    [InlineData("\"router_jitter_noise\": 0.01", "router_jitter_noise is not 0")]
    [InlineData("\"sliding_window\": 0", "sliding_window is 0")]
    [InlineData("\"rope_parameters\": {\"rope_theta\": 1e6, \"rope_type\": \"yarn\"}", "rope_type \"yarn\"")]
    public void UnsupportedConfigValue_IsAUserErrorNamingFileAndField(string field, string message)
    {
        string path = WriteConfig("{" + Minimal + ", " + field + "}");
        var e = Assert.Throws<UserError>(() => MixtralConfig.Load(path));
        Assert.StartsWith(path, e.Message);
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void MissingRequiredField_IsNamed()
    {
        string path = WriteConfig("{" + Minimal.Replace("\"num_local_experts\": 4, ", "") + "}");
        Assert.Contains("\"num_local_experts\" is missing", Assert.Throws<UserError>(() => MixtralConfig.Load(path)).Message);
    }

    [Fact]
    public void SlidingWindowMask_SeesTheLastWindowKeys()
    {
        // S = 4, window 2: row i attends j ∈ (i−2, i].
        var expected = new[] { true, false, false, false, true, true, false, false, false, true, true, false, false, false, true, true };
        Assert.Equal(expected, MixtralModel.SlidingWindowCausalMask(4, 2).flatten().data<bool>().ToArray());
    }

    [Fact]
    public void SlidingWindow_IsHonoured_PositionsInsideTheWindowKeepTransformersLogits()
    {
        using var expected = SafetensorsFile.Open(Path.Combine(Fixture, "expected.safetensors"));
        using var ids = expected.Read("input_ids");
        using var reference = expected.Read("logits");
        var config = MixtralStateDictAdapter.ReadConfig(Fixture);
        Tensor Logits(int? window)
        {
            using var model = new MixtralModel(config with { SlidingWindow = window }, new() { TopK = 2 }, ScalarType.Float32, CPU);
            MixtralStateDictAdapter.Load(model, Fixture);
            using var _ = torch.no_grad();
            return model.Forward(ids).LogitsBSV!;
        }
        // A window as long as the sequence changes nothing.
        Assert.True((Logits(32) - reference).abs().max().item<float>() <= 1e-4);
        // Window 8: positions 0..7 see their whole causal prefix anyway; later ones lose the far keys.
        var windowed = Logits(8);
        Assert.True((windowed.narrow(1, 0, 8) - reference.narrow(1, 0, 8)).abs().max().item<float>() <= 1e-4);
        Assert.True((windowed.narrow(1, 8, 24) - reference.narrow(1, 8, 24)).abs().max().item<float>() > 1e-3);
    }

    [Fact]
    public void Writer_AlignsTheHeader_WritesFormatPt_AndReplacesALargerFileExactly()
    {
        string path = Path.Combine(_dir, "t.safetensors");
        SafetensorsFile.Write(path, [new("big", torch.zeros(1000))]);
        var tensors = new KeyValuePair<string, Tensor>[]
        {
            new("a", torch.tensor(new float[] { 1.5f, -2, 3 })),
            new("b", torch.tensor(new long[] { 1, -2, long.MaxValue }).view(3, 1)),
            new("c", torch.tensor(new float[] { 0.1f, 7, -3.25f }).to(ScalarType.BFloat16)),
        };
        SafetensorsFile.Write(path, tensors);
        byte[] bytes = File.ReadAllBytes(path);
        ulong headerLength = BitConverter.ToUInt64(bytes, 0);
        Assert.Equal(0UL, (8 + headerLength) % 8);
        // 12 + 24 + 6 data bytes after the header, nothing left over from the larger file.
        Assert.Equal(8 + (long)headerLength + 12 + 24 + 6, bytes.LongLength);
        using var doc = JsonDocument.Parse(Encoding.UTF8.GetString(bytes, 8, (int)headerLength));
        Assert.Equal("pt", doc.RootElement.GetProperty("__metadata__").GetProperty("format").GetString());
        Assert.Equal("[12,36]", doc.RootElement.GetProperty("b").GetProperty("data_offsets").GetRawText());
        using var f = SafetensorsFile.Open(path);
        foreach (var (name, t) in tensors)
        {
            using var read = f.Read(name);
            Assert.Equal(t.dtype, read.dtype);
            Assert.Equal(t.shape, read.shape);
            Assert.True(t.Equals(read), name);
        }
        Assert.Empty(Directory.GetFiles(_dir, "*.tmp*"));
    }

    [Fact]
    public void HeaderWhoseShapeDisagreesWithItsOffsets_NamesTheTensor()
    {
        string path = Path.Combine(_dir, "bad.safetensors");
        WriteRaw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 12);
        var e = Assert.Throws<UserError>(() => SafetensorsFile.Open(path));
        Assert.Contains("tensor 'w' has shape [2, 2] (F32, 16 bytes) but its data offsets span 12 bytes", e.Message);
    }

    [Fact]
    public void HeaderLongerThanTheFile_IsTruncation()
    {
        string path = Path.Combine(_dir, "short.safetensors");
        File.WriteAllBytes(path, [.. BitConverter.GetBytes(4096UL), .. "{}"u8.ToArray()]);
        var e = Assert.Throws<UserError>(() => SafetensorsFile.Open(path));
        Assert.Contains("the header claims 4096 bytes", e.Message);
        Assert.Contains("truncated", e.Message);
    }

    [Fact]
    public void MissingTensor_NamesTheTensorAndTheFile()
    {
        string ckpt = CopyFixtureWithout("model.layers.1.block_sparse_moe.experts.2.w3.weight");
        var e = Assert.Throws<UserError>(() => MixtralStateDictAdapter.LoadModel(ckpt, ScalarType.Float32, CPU).Dispose());
        Assert.Contains("no tensor 'model.layers.1.block_sparse_moe.experts.2.w3.weight'", e.Message);
        Assert.Contains("model.safetensors", e.Message);
    }

    [Fact]
    public void IntegerWeights_AreRejectedByName()
    {
        string ckpt = CopyFixtureWithout(null, ("model.norm.weight", torch.ones(64, dtype: ScalarType.Int32)));
        var e = Assert.Throws<UserError>(() => MixtralStateDictAdapter.LoadModel(ckpt, ScalarType.Float32, CPU).Dispose());
        Assert.Contains("tensor 'model.norm.weight' is I32; weights must be floating point", e.Message);
    }

    [Fact]
    public void SavedModel_LoadsBack_WithTheHubKeysOfTheFixture()
    {
        var config = MixtralStateDictAdapter.ReadConfig(Fixture);
        using var model = MixtralModel.Random(config, seed: 11, ScalarType.Float32, CPU);
        string saved = Path.Combine(_dir, "saved");
        MixtralStateDictAdapter.Save(model, saved);
        using (var ours = SafetensorsFile.Open(Path.Combine(saved, "model.safetensors")))
        using (var hub = SafetensorsFile.Open(Path.Combine(Fixture, "model.safetensors")))
        {
            Assert.Equal(hub.Entries.Keys.Order(StringComparer.Ordinal), ours.Entries.Keys.Order(StringComparer.Ordinal));
            Assert.All(hub.Entries.Values, e => Assert.Equal(e.Shape, ours.Entries[e.Name].Shape));
        }
        using var reloaded = MixtralStateDictAdapter.LoadModel(saved, ScalarType.Float32, CPU);
        Assert.Equal(config with { TorchDtype = "float32" }, reloaded.Config with { TorchDtype = "float32" });
        var a = model.named_parameters().ToArray();
        var b = reloaded.named_parameters().ToArray();
        Assert.Equal(a.Select(p => p.name), b.Select(p => p.name));
        for (int i = 0; i < a.Length; i++) Assert.True(a[i].parameter.Equals(b[i].parameter), a[i].name);
    }

    [Fact]
    public void RandomInit_IsDeterministicPerSeed()
    {
        var config = MixtralStateDictAdapter.ReadConfig(Fixture);
        using var a = MixtralModel.Random(config, 5, ScalarType.Float32, CPU);
        using var b = MixtralModel.Random(config, 5, ScalarType.Float32, CPU);
        using var c = MixtralModel.Random(config, 6, ScalarType.Float32, CPU);
        Assert.True(a.LmHead.Equals(b.LmHead));
        Assert.False(a.LmHead.Equals(c.LmHead));
        // initializer_range 0.02: the sample std of a 512×64 matrix is within a few percent of it.
        Assert.InRange(a.LmHead.std().item<float>(), 0.019, 0.021);
    }

    [Fact]
    public void LargeModel_IsSavedAsShardsWithAnIndex_AndLoadsBack()
    {
        var config = MixtralStateDictAdapter.ReadConfig(Fixture);
        using var model = MixtralModel.Random(config, seed: 2, ScalarType.Float32, CPU);
        string saved = Path.Combine(_dir, "sharded");
        // 41 tensors, 2 × 131072-byte embedding/head matrices and smaller ones: 200 kB shards need several files.
        MixtralStateDictAdapter.Save(model, saved, maxShardBytes: 200_000);
        var shards = Directory.GetFiles(saved, "model-*-of-*.safetensors").Select(Path.GetFileName).Order(StringComparer.Ordinal).ToArray();
        Assert.True(shards.Length > 2, string.Join(", ", shards));
        Assert.Equal($"model-00001-of-{shards.Length:D5}.safetensors", shards[0]);
        Assert.False(File.Exists(Path.Combine(saved, "model.safetensors")));
        using var index = JsonDocument.Parse(File.ReadAllText(Path.Combine(saved, "model.safetensors.index.json")));
        long totalSize = index.RootElement.GetProperty("metadata").GetProperty("total_size").GetInt64();
        Assert.Equal(model.parameters().Sum(p => p.NumberOfElements * 4), totalSize);
        Assert.Equal(41, index.RootElement.GetProperty("weight_map").EnumerateObject().Count());
        using var reloaded = MixtralStateDictAdapter.LoadModel(saved, ScalarType.Float32, CPU);
        foreach (var ((name, a), (_, b)) in model.named_parameters().Zip(reloaded.named_parameters()))
            Assert.True(a.Equals(b), name);
    }

    private static void WriteRaw(string path, string header, int dataBytes)
    {
        byte[] h = Encoding.UTF8.GetBytes(header);
        File.WriteAllBytes(path, [.. BitConverter.GetBytes((ulong)h.Length), .. h, .. new byte[dataBytes]]);
    }

    private string CopyFixtureWithout(string? drop, (string Key, Tensor Value)? replace = null)
    {
        string ckpt = Path.Combine(_dir, "ckpt-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(ckpt);
        File.Copy(Path.Combine(Fixture, "config.json"), Path.Combine(ckpt, "config.json"));
        using var f = SafetensorsFile.Open(Path.Combine(Fixture, "model.safetensors"));
        var tensors = f.Entries.Keys.Where(k => k != drop)
            .Select(k => new KeyValuePair<string, Tensor>(k, replace is { } r && r.Key == k ? r.Value : f.Read(k)));
        SafetensorsFile.Write(Path.Combine(ckpt, "model.safetensors"), tensors);
        return ckpt;
    }
}
