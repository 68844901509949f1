using Moe.Runtime.Checkpoints;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>`moe forward` as users run it, against the transformers fixture, and its errors.</summary>
[Collection("Console")]
public class ForwardCommandTests() : ForwardCommandTestBase("moe-forward-")
{
    [Fact]
    public void ForwardWithGrads_WritesEveryTensorOfTheFixtureWithinTolerance()
    {
        string output = Path.Combine(Dir, "out.safetensors");
        var (exit, err) = Run("forward", "--checkpoint", Fixture, "--input", Input("in.safetensors", FixtureIds()), "--output", output, "--grads");
        Assert.True(exit == 0, err);
        using var ours = SafetensorsFile.Open(output);
        using var expected = SafetensorsFile.Open(Path.Combine(Fixture, "expected.safetensors"));
        // transformers' readers expect the writer's metadata {"format": "pt"} in the header (u64 length, then JSON).
        var bytes = File.ReadAllBytes(output);
        string header = System.Text.Encoding.UTF8.GetString(bytes, 8, (int)BitConverter.ToUInt64(bytes, 0));
        Assert.Contains("\"__metadata__\":{\"format\":\"pt\"}", header);
        foreach (var key in expected.Entries.Keys.Where(k => k != "input_ids"))
        {
            using var e = expected.Read(key);
            using var o = ours.Read(key);
            Assert.Equal(e.shape, o.shape);
            if (key == "logits" || key.StartsWith("router_logits", StringComparison.Ordinal))
                Assert.True((o - e).abs().max().item<float>() <= 1e-4, $"{key} differs");
            else if (key.StartsWith("grad.", StringComparison.Ordinal))
                Assert.True((o - e).norm().item<float>() <= 1e-4 * e.norm().item<float>(), $"{key} differs");
            else
                Assert.True(Math.Abs(o.item<float>() - e.item<float>()) <= 1e-5 * Math.Abs(e.item<float>()), $"{key} differs");
        }
    }

    [Fact]
    public void CudaOnACpuHost_SaysWhatItLookedFor()
    {
        if (torch.cuda.is_available()) Assert.Skip("this host has CUDA: the message for a CPU-only host cannot be seen here");
        var (exit, err) = Run("forward", "--checkpoint", Fixture, "--input", Input("in.safetensors", FixtureIds()), "--output", Path.Combine(Dir, "o.safetensors"), "--device", "cuda");
        Assert.Equal(2, exit);
        Assert.Contains("torch.cuda.is_available() is false", err);
        Assert.Contains("LD_LIBRARY_PATH", err);
        if (Environment.GetEnvironmentVariable("MOE_TORCH_LIB") is null or "")
            Assert.Contains("MOE_TORCH_LIB is unset, so python's torch/lib was tried", err);
    }

    [Fact]
    public void TruncatedCheckpoint_NamesTheFileAndTheTensor()
    {
        string ckpt = Path.Combine(Dir, "ckpt");
        Directory.CreateDirectory(ckpt);
        File.Copy(Path.Combine(Fixture, "config.json"), Path.Combine(ckpt, "config.json"));
        byte[] bytes = File.ReadAllBytes(Path.Combine(Fixture, "model.safetensors"));
        File.WriteAllBytes(Path.Combine(ckpt, "model.safetensors"), bytes[..(bytes.Length - 1000)]);
        var (exit, err) = Run("forward", "--checkpoint", ckpt, "--input", Input("in.safetensors", FixtureIds()), "--output", Path.Combine(Dir, "o.safetensors"));
        Assert.Equal(2, exit);
        Assert.Matches(@"model\.safetensors: tensor '[a-z0-9_.]+' ends at byte \d+ of the data section, which has only \d+ bytes", err);
        Assert.Contains("truncated", err);
        Assert.False(File.Exists(Path.Combine(Dir, "o.safetensors")));
    }

    [Fact]
    public void ConfigThatDisagreesWithTheWeights_NamesTheTensorAndShapes()
    {
        string ckpt = Path.Combine(Dir, "ckpt2");
        Directory.CreateDirectory(ckpt);
        File.WriteAllText(Path.Combine(ckpt, "config.json"), File.ReadAllText(Path.Combine(Fixture, "config.json")).Replace("\"intermediate_size\": 96", "\"intermediate_size\": 128"));
        File.Copy(Path.Combine(Fixture, "model.safetensors"), Path.Combine(ckpt, "model.safetensors"));
        var (exit, err) = Run("forward", "--checkpoint", ckpt, "--input", Input("in.safetensors", FixtureIds()), "--output", Path.Combine(Dir, "o.safetensors"));
        Assert.Equal(2, exit);
        Assert.Contains("has shape [96, 64] but the model expects [128, 64] from config.json", err);
    }

    [Fact]
    public void MissingShard_IsNamed()
    {
        string ckpt = Path.Combine(Dir, "sharded");
        Directory.CreateDirectory(ckpt);
        File.Copy(Path.Combine(Fixture, "config.json"), Path.Combine(ckpt, "config.json"));
        File.WriteAllText(Path.Combine(ckpt, "model.safetensors.index.json"), "{\"weight_map\": {\"lm_head.weight\": \"model-00001-of-00002.safetensors\"}}");
        var (exit, err) = Run("forward", "--checkpoint", ckpt, "--input", Input("in.safetensors", FixtureIds()), "--output", Path.Combine(Dir, "o.safetensors"));
        Assert.Equal(2, exit);
        Assert.Contains("lists shard model-00001-of-00002.safetensors for 'lm_head.weight'", err);
    }

    [Fact]
    public void MalformedShardIndex_IsANamedErrorNotAStackTrace()
    {
        string ckpt = Path.Combine(Dir, "bad-index");
        Directory.CreateDirectory(ckpt);
        File.Copy(Path.Combine(Fixture, "config.json"), Path.Combine(ckpt, "config.json"));
        File.WriteAllText(Path.Combine(ckpt, "model.safetensors.index.json"), "{\"weight_map\": {");
        var (exit, err) = Run("forward", "--checkpoint", ckpt, "--input", Input("in.safetensors", FixtureIds()), "--output", Path.Combine(Dir, "o.safetensors"));
        Assert.Equal(2, exit);
        Assert.Contains("model.safetensors.index.json: not valid JSON", err);
        Assert.DoesNotContain("   at ", err);
    }

    [Fact]
    public void ShardedCheckpoint_LoadsLikeTheSingleFile()
    {
        // Split the fixture into two shards with an index, as the hub does for large models.
        string ckpt = Path.Combine(Dir, "two-shards");
        Directory.CreateDirectory(ckpt);
        File.Copy(Path.Combine(Fixture, "config.json"), Path.Combine(ckpt, "config.json"));
        using (var f = SafetensorsFile.Open(Path.Combine(Fixture, "model.safetensors")))
        {
            var keys = f.Entries.Keys.OrderBy(k => k, StringComparer.Ordinal).ToArray();
            var halves = new[] { keys[..(keys.Length / 2)], keys[(keys.Length / 2)..] };
            var map = new List<string>();
            for (int i = 0; i < 2; i++)
            {
                string shard = $"model-0000{i + 1}-of-00002.safetensors";
                SafetensorsFile.Write(Path.Combine(ckpt, shard), halves[i].Select(k => new KeyValuePair<string, Tensor>(k, f.Read(k))));
                map.AddRange(halves[i].Select(k => $"\"{k}\": \"{shard}\""));
            }
            File.WriteAllText(Path.Combine(ckpt, "model.safetensors.index.json"), "{\"metadata\": {}, \"weight_map\": {" + string.Join(", ", map) + "}}");
        }
        string output = Path.Combine(Dir, "sharded-out.safetensors");
        var (exit, err) = Run("forward", "--checkpoint", ckpt, "--input", Input("in.safetensors", FixtureIds()), "--output", output);
        Assert.True(exit == 0, err);
        using var ours = SafetensorsFile.Open(output);
        using var expected = SafetensorsFile.Open(Path.Combine(Fixture, "expected.safetensors"));
        Assert.True((ours.Read("logits") - expected.Read("logits")).abs().max().item<float>() <= 1e-4);
    }
}
