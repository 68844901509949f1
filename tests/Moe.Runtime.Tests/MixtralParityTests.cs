using Moe.Runtime.Checkpoints;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using Moe.Tests;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>Our Mixtral against transformers 5.17 on shared/fixtures/mixtral-tiny (float32, CPU).</summary>
public class MixtralParityTests
{
    private static string FixtureDir => TestPaths.Fixture("mixtral-tiny");

    private static MixtralModel LoadFixtureModel(bool loopExperts = false)
    {
        var config = MixtralStateDictAdapter.ReadConfig(FixtureDir);
        var model = new MixtralModel(config, new MoeOptions { TopK = config.TopK }, ScalarType.Float32, CPU);
        MixtralStateDictAdapter.Load(model, FixtureDir);
        foreach (var l in model.Layers) l.Moe.ExpertWeights.ForceLoop = loopExperts;
        return model;
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Forward_MatchesTransformers(bool loopExperts)
    {
        using var expected = SafetensorsFile.Open(Path.Combine(FixtureDir, "expected.safetensors"));
        using var model = LoadFixtureModel(loopExperts);
        using var ids = expected.Read("input_ids");
        var (labels, mask) = MixtralModel.ShiftedLabels(ids);
        using var _ = torch.no_grad();
        var output = model.Forward(ids, labels, mask);

        using var logits = expected.Read("logits");
        double maxDiff = (output.LogitsBSV! - logits).abs().max().item<float>();
        Assert.True(maxDiff <= 1e-4, $"logits differ by {maxDiff}");
        for (int l = 0; l < model.Config.Layers; l++)
        {
            using var router = expected.Read($"router_logits.{l}");
            double d = (output.Layers[l].Routing.LogitsTE - router).abs().max().item<float>();
            Assert.True(d <= 1e-4, $"router logits of layer {l} differ by {d}");
        }
        AssertRelative(expected.Read("lm_loss").item<float>(), output.LmLoss!.item<float>(), 1e-5, "lm_loss");
        AssertRelative(expected.Read("aux_loss").item<float>(), output.AuxLoss.item<float>(), 1e-5, "aux_loss");
        double loss = output.LmLoss!.item<float>() + model.Config.RouterAuxLossCoef * output.AuxLoss.item<float>();
        AssertRelative(expected.Read("loss").item<float>(), loss, 1e-5, "loss");
    }

    [Fact]
    public void Gradients_MatchTransformers()
    {
        using var expected = SafetensorsFile.Open(Path.Combine(FixtureDir, "expected.safetensors"));
        using var model = LoadFixtureModel();
        model.train();
        using var ids = expected.Read("input_ids");
        var (labels, mask) = MixtralModel.ShiftedLabels(ids);
        var output = model.Forward(ids, labels, mask);
        (output.LmLoss! + model.Config.RouterAuxLossCoef * output.AuxLoss).backward();
        int checkedCount = 0;
        foreach (var (key, grad) in MixtralStateDictAdapter.Named(model, gradients: true))
        {
            using var reference = expected.Read("grad." + key);
            double err = (grad - reference).norm().item<float>() / Math.Max(reference.norm().item<float>(), 1e-12);
            Assert.True(err <= 1e-4, $"gradient of {key}: relative error {err}");
            checkedCount++;
        }
        Assert.Equal(expected.Entries.Keys.Count(k => k.StartsWith("grad.", StringComparison.Ordinal)), checkedCount);
    }

    private static void AssertRelative(double expected, double actual, double tolerance, string what)
    {
        double rel = Math.Abs(actual - expected) / Math.Abs(expected);
        Assert.True(rel <= tolerance, $"{what}: expected {expected}, got {actual} (relative error {rel})");
    }
}
