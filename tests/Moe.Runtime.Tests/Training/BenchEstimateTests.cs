using System.Text.Json;
using Moe.Runtime.Commands.Bench;
using Moe.Runtime.Modeling;
using Xunit;

namespace Moe.Runtime.Tests.Training;

/// <summary>
/// `moe bench` prints the plan's estimate beside its measurement (docs/performance.md's calibration table). The terms
/// for two 8x7B layers at 4096 tokens are checked against numbers worked out by hand from the model's shapes, and the
/// bench's whole training step (--optimizer) runs on the CPU.
/// </summary>
[Collection("Console")]
public class BenchEstimateTests
{
    private const double Gib = 1L << 30;

    [Fact]
    public void EightBySeven_TwoLayers_TermsAsWorkedOutByHand()
    {
        // Per layer: q, o 4096·4096 each, k, v 4096·1024 each = 41,943,040; two norms 8,192; router 8·4096 = 32,768;
        // experts 8 · 3 · 4096 · 14,336 = 1,409,286,144 — 1,451,270,144 a layer. Two layers, embedding and LM head
        // 2 · 32,000 · 4096 = 262,144,000, final norm 4096: 3,164,688,384 parameters.
        const double parameters = 3_164_688_384;
        // Activations per layer (bf16): T·(attention 3h + 2·Nq·d + 2·Nkv·d = 22,528, + MoE input 4096)
        // + T·k rows · (3h + 2F = 40,960) = 4096 · 26,624 + 8192 · 40,960 = 444,596,224 elements; two layers · 2 bytes,
        // plus fp32 log-probabilities 4096 · 32,000 · 4 = 524,288,000 bytes.
        const double activations = 2 * 444_596_224.0 * 2 + 524_288_000;
        var request = new BenchCommand.Request("8x7b", 2, 4096, 1, 1, "cuda", MainGrads: false);
        var config = MixtralConfig.From(Dsl.Model.Mixtral8x7B) with { Layers = 2 };
        var protocol = BenchEstimate.For(request, config);
        Assert.Equal(parameters * 2 / Gib, protocol.Terms["weights"], 9);
        Assert.Equal(parameters * 2 / Gib, protocol.Terms["gradients"], 9);   // bf16 .grad
        Assert.Equal(0, protocol.Terms["optimizer"]);
        Assert.Equal(activations / Gib, protocol.Terms["activations"], 9);
        // One layer's backward: ∂gate/up of 8192 rows, 8192 · 28,672 · 2 bytes; its weight gradient is the .grad here.
        Assert.Equal(8192.0 * 28_672 * 2 / Gib, protocol.Terms["backward"], 9);
        Assert.Equal(4e9 / Gib, protocol.Terms["overhead"], 9);
        Assert.Equal(protocol.Terms.Values.Sum(), protocol.Total, 9);

        // A training step: fp32 main gradients, and fp32 master weights + Adam's two moments (12 bytes a parameter, one rank).
        var training = BenchEstimate.For(request with { MainGrads = true, Optimizer = true }, config);
        Assert.Equal(parameters * 4 / Gib, training.Terms["gradients"], 9);
        Assert.Equal(parameters * 12 / Gib, training.Terms["optimizer"], 9);
        // With fp32 main gradients the bf16 gate/up weight gradient, 8 · 28,672 · 4096 · 2 bytes, is held until it lands.
        Assert.Equal((8192.0 * 28_672 * 2 + 8.0 * 28_672 * 4096 * 2) / Gib, training.Terms["backward"], 9);
    }

    [Fact]
    public void Optimizer_RunsAWholeStepOnCpu_AndNeedsMainGradients()
    {
        var output = new StringWriter();
        Assert.Equal(0, BenchCommand.Execute(new("tiny", 2, 32, 1, 1, "cpu", Optimizer: true), output));
        using var doc = JsonDocument.Parse(output.ToString());
        Assert.True(doc.RootElement.GetProperty("optimizer").GetBoolean());
        var terms = doc.RootElement.GetProperty("estimate_terms_gb");
        Assert.True(terms.GetProperty("optimizer").GetDouble() > 0);
        Assert.Equal(terms.EnumerateObject().Sum(t => t.Value.GetDouble()), doc.RootElement.GetProperty("estimate_gb").GetDouble(), 9);
        var error = Assert.Throws<UserError>(() => BenchCommand.Execute(new("tiny", 2, 32, 1, 1, "cpu", MainGrads: false, Optimizer: true), new StringWriter()));
        Assert.Contains("--main-grads true", error.Message);
    }
}
