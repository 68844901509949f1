using Moe.Runtime.Checkpoints;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>`moe forward` with bfloat16 and with inputs users get wrong.</summary>
[Collection("Console")]
public class ForwardCommandInputTests() : ForwardCommandTestBase("moe-forward-in-")
{
    [Fact]
    public void Bfloat16_StaysWithinBfloat16RoundingOfTransformersFloat32()
    {
        string output = Path.Combine(Dir, "bf16.safetensors");
        var (exit, err) = Run("forward", "--checkpoint", Fixture, "--input", Input("in.safetensors", FixtureIds()), "--output", output, "--dtype", "bfloat16");
        Assert.True(exit == 0, err);
        using var ours = SafetensorsFile.Open(output);
        using var expected = SafetensorsFile.Open(Path.Combine(Fixture, "expected.safetensors"));
        // bf16 keeps 8 significant bits (relative step 2^-8 ≈ 0.4%). The logits (|x| ≲ 1) of two layers move by
        // a few thousandths (0.0041 measured) and the losses, averages over 62 positions, far less (1e-5
        // measured); the bounds leave a 5× and 100× margin for other CPUs' kernels.
        using var logits = ours.Read("logits");
        Assert.Equal(ScalarType.Float32, logits.dtype);
        double maxDiff = (logits - expected.Read("logits")).abs().max().item<float>();
        Assert.InRange(maxDiff, 1e-6, 0.02);
        foreach (var key in new[] { "lm_loss", "aux_loss", "loss" })
        {
            double e = expected.Read(key).item<float>(), o = ours.Read(key).item<float>();
            Assert.True(Math.Abs(o - e) <= 1e-3 * Math.Abs(e), $"{key}: {o} vs {e}");
        }
    }

    [Fact]
    public void InputWithoutInputIds_IsNamed()
    {
        string path = Path.Combine(Dir, "other.safetensors");
        SafetensorsFile.Write(path, [new("tokens", torch.zeros(1, 4, dtype: ScalarType.Int64))]);
        var (exit, err) = Run("forward", "--checkpoint", Fixture, "--input", path, "--output", Path.Combine(Dir, "o.safetensors"));
        Assert.Equal(2, exit);
        Assert.Contains($"{path}: has no tensor 'input_ids'", err);
    }

    [Fact]
    public void FloatInputIds_AreRejected()
    {
        string path = Input("float.safetensors", torch.zeros(2, 4));
        var (exit, err) = Run("forward", "--checkpoint", Fixture, "--input", path, "--output", Path.Combine(Dir, "o.safetensors"));
        Assert.Equal(2, exit);
        Assert.Contains("input_ids must be int64 [B, S]; it is F32 [2, 4]", err);
    }

    [Fact]
    public void IdsOutsideTheVocabulary_AreRejected()
    {
        string path = Input("big.safetensors", torch.tensor(new long[] { 1, 2, 512 }).view(1, 3));
        var (exit, err) = Run("forward", "--checkpoint", Fixture, "--input", path, "--output", Path.Combine(Dir, "o.safetensors"));
        Assert.Equal(2, exit);
        Assert.Contains("range over [1, 512] but the vocabulary has 512 ids", err);
        Assert.False(File.Exists(Path.Combine(Dir, "o.safetensors")));
    }
}
