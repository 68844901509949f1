using Moe.Runtime.Checkpoints;
using Moe.Runtime.MixtureOfExperts;
using Moe.Tests;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>transformers' 2-D attention (padding) mask: attention and the load-balancing loss.</summary>
public class PaddingMaskTests
{
    [Fact]
    public void MaskedTransformersAuxLoss_EqualsTheLossOverTheUnpaddedTokensAlone()
    {
        var gen = new torch.Generator(5);
        var layers = new[] { torch.randn(6, 4, generator: gen) * 2, torch.randn(6, 4, generator: gen) * 2 };
        var mask = torch.tensor(new long[] { 1, 1, 0, 1, 0, 1 });
        var keep = torch.tensor(new long[] { 0, 1, 3, 5 });
        var expected = AuxLosses.Transformers(layers.Select(l => l.index_select(0, keep)).ToArray(), 4, 2).item<float>();
        var masked = AuxLosses.Transformers(layers, 4, 2, mask).item<float>();
        Assert.Equal(expected, masked, 5);
        Assert.NotEqual(expected, AuxLosses.Transformers(layers, 4, 2).item<float>(), 3);
    }

    [Fact]
    public void LeftPadding_LeavesTheRealTokensLogitsAsWithoutPadding()
    {
        string fixture = TestPaths.Fixture("mixtral-tiny");
        using var expected = SafetensorsFile.Open(Path.Combine(fixture, "expected.safetensors"));
        using var model = MixtralStateDictAdapter.LoadModel(fixture, ScalarType.Float32, CPU);
        var ids = expected.Read("input_ids").narrow(0, 0, 1).narrow(1, 0, 16);           // [1, 16]
        var padded = torch.cat(new[] { torch.zeros(1, 4, dtype: ScalarType.Int64), ids }, 1); // 4 pad ids (0) in front
        var attention = torch.cat(new[] { torch.zeros(1, 4, dtype: ScalarType.Int64), torch.ones(1, 16, dtype: ScalarType.Int64) }, 1);
        // transformers' positions for left padding: cumsum(mask) − 1, padding clamped to 0.
        var positions = (attention.cumsum(1) - 1).clamp_min(0);
        using var _ = torch.no_grad();
        var plain = model.Forward(ids).LogitsBSV!;
        var withPadding = model.Forward(padded, positionIdsBS: positions, attentionMaskBS: attention).LogitsBSV!;
        var real = withPadding.narrow(1, 4, 16);
        Assert.False(withPadding.isnan().any().item<bool>());
        Assert.True((real - plain).abs().max().item<float>() <= 1e-4);
        // Without the mask the real tokens would read the padding.
        var unmasked = model.Forward(padded, positionIdsBS: positions).LogitsBSV!.narrow(1, 4, 16);
        Assert.True((unmasked - plain).abs().max().item<float>() > 1e-3);
    }
}
