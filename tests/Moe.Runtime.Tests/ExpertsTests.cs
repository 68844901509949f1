using Moe.Runtime;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>The grouped-GEMM experts against the per-expert loop and against the SwiGLU formula.</summary>
public class ExpertsTests
{
    private static (Tensor Out, Tensor GradRows, Tensor GradGateUp, Tensor GradDown, bool Grouped) Run(bool loop, Tensor rowsRH, Tensor countsE, Tensor gateUp, Tensor down)
    {
        using var experts = new Experts(4, (int)down.shape[1], (int)down.shape[2], ScalarType.Float32, CPU) { ForceLoop = loop };
        bool grouped = experts.UsesGroupedGemm(rowsRH);
        using (torch.no_grad())
        {
            experts.GateUp.copy_(gateUp);
            experts.Down.copy_(down);
        }
        var rows = rowsRH.detach().requires_grad_(true);
        var y = experts.Forward(rows, countsE);
        // A non-uniform upstream gradient (the grouped kernel must not see an expanded one).
        (y * torch.linspace(-1, 1, y.NumberOfElements).view(y.shape)).sum().backward();
        return (y.detach(), rows.grad!.clone(), experts.GateUp.grad!.clone(), experts.Down.grad!.clone(), grouped);
    }

    [Fact]
    public void GroupedGemmAndLoop_AgreeInForwardAndBackward_WithAnEmptyExpert()
    {
        // H = 8, I = 4 in fp32: rows of 32 and 16 bytes, which torch._grouped_mm accepts.
        var gen = new torch.Generator(7);
        var rows = torch.randn(10, 8, generator: gen);
        var counts = torch.tensor(new long[] { 3, 0, 5, 2 });
        var gateUp = torch.randn(4, 8, 8, generator: gen) * 0.3;
        var down = torch.randn(4, 8, 4, generator: gen) * 0.3;
        var grouped = Run(false, rows, counts, gateUp, down);
        var loop = Run(true, rows, counts, gateUp, down);
        Assert.True(grouped.Grouped);
        Assert.False(loop.Grouped);
        Assert.True(torch.allclose(grouped.Out, loop.Out, rtol: 1e-5, atol: 1e-6));
        Assert.True(torch.allclose(grouped.GradRows, loop.GradRows, rtol: 1e-5, atol: 1e-6));
        Assert.True(torch.allclose(grouped.GradGateUp, loop.GradGateUp, rtol: 1e-5, atol: 1e-6));
        Assert.True(torch.allclose(grouped.GradDown, loop.GradDown, rtol: 1e-5, atol: 1e-6));
        // Expert 1 received no rows: no gradient reaches its weights.
        Assert.Equal(0f, grouped.GradGateUp[1].abs().sum().item<float>());
        Assert.Equal(0f, grouped.GradDown[1].abs().sum().item<float>());
    }

    [Fact]
    public void GroupedNode_SumsWeightGradientsOverBackwardCalls_AndLeavesFrozenWeightsAlone()
    {
        // The grouped node accumulates its weight gradients itself: a second backward adds to .grad as
        // autograd's accumulator would, and a weight without requires_grad gets none.
        var gen = new torch.Generator(11);
        var rows = torch.randn(6, 8, generator: gen);
        var counts = torch.tensor(new long[] { 2, 1, 3, 0 });
        using var experts = new Experts(4, 8, 4, ScalarType.Float32, CPU);
        using (torch.no_grad())
        {
            experts.GateUp.copy_(torch.randn(4, 8, 8, generator: gen) * 0.3);
            experts.Down.copy_(torch.randn(4, 8, 4, generator: gen) * 0.3);
        }
        Assert.True(experts.UsesGroupedGemm(rows));
        var x = rows.detach().requires_grad_(true);
        experts.Forward(x, counts).square().sum().backward();
        var once = (experts.GateUp.grad!.clone(), experts.Down.grad!.clone(), x.grad!.clone());
        experts.Forward(x, counts).square().sum().backward();
        Assert.True(torch.allclose(experts.GateUp.grad!, 2 * once.Item1, rtol: 1e-6, atol: 1e-7));
        Assert.True(torch.allclose(experts.Down.grad!, 2 * once.Item2, rtol: 1e-6, atol: 1e-7));
        Assert.True(torch.allclose(x.grad!, 2 * once.Item3, rtol: 1e-6, atol: 1e-7));

        experts.GateUp.grad = null;
        experts.Down.grad = null;
        experts.Down.requires_grad_(false);
        experts.Forward(rows, counts).sum().backward();
        Assert.NotNull(experts.GateUp.grad);
        Assert.Null(experts.Down.grad);
    }

    [Fact]
    public void AFailureInTheExpertsBackward_IsThrownByComplete_NotACrash()
    {
        // Changing a weight in place between forward and backward invalidates what the backward saved:
        // libtorch refuses to unpack it inside our managed backward, which must not take the process down.
        var gen = new torch.Generator(5);
        using var experts = new Experts(4, 8, 4, ScalarType.Float32, CPU);
        using (torch.no_grad())
        {
            experts.GateUp.copy_(torch.randn(4, 8, 8, generator: gen));
            experts.Down.copy_(torch.randn(4, 8, 4, generator: gen));
        }
        var x = torch.randn(6, 8, generator: gen).requires_grad_(true);
        var y = experts.Forward(x, torch.tensor(new long[] { 2, 1, 3, 0 }));
        using (torch.no_grad()) experts.Down.add_(1.0);
        y.sum().backward();
        var e = Assert.Throws<Moe.Runtime.UserError>(ManagedBackward.Complete);
        Assert.Contains("backward of GroupedSwiGlu failed", e.Message);
        Assert.Contains("inplace", e.Message);
        ManagedBackward.Complete();   // reported once
    }

    [Fact]
    public void Row_GoesThroughItsExpertsSwiGlu()
    {
        // Row 4 (the second of expert 2's rows when counts are 3, 0, 5, 2) by the formula
        // W2 · (SiLU(W1·x) ⊙ W3·x), with W1 = gate_up rows 0..4 and W3 = rows 5..9.
        var gen = new torch.Generator(3);
        var rows = torch.randn(10, 6, generator: gen);
        var gateUp = torch.randn(4, 10, 6, generator: gen);
        var down = torch.randn(4, 6, 5, generator: gen);
        // H = 6, I = 5 in fp32: 24- and 20-byte rows break _grouped_mm's 16-byte stride rule, so the loop runs.
        var (y, _, _, _, grouped) = Run(false, rows, torch.tensor(new long[] { 3, 0, 5, 2 }), gateUp, down);
        Assert.False(grouped);
        var x = rows[4];
        var w1 = gateUp[2].narrow(0, 0, 5);
        var w3 = gateUp[2].narrow(0, 5, 5);
        var expected = down[2].matmul(nn.functional.silu(w1.matmul(x)) * w3.matmul(x));
        Assert.True(torch.allclose(y[4], expected, rtol: 1e-5, atol: 1e-5));
    }
}
