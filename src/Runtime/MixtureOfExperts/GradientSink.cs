using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

/// <summary>
/// Where a weight's gradient goes when it skips autograd's accumulator: straight into its fp32 main gradient
/// (Megatron's gradient-accumulation fusion writes the weight-gradient GEMM into main_grad the same way). The first
/// micro-batch of a step copies, the later ones add, so the main gradient needs no zeroing pass and no bf16 copy
/// of the gradient is kept: for the experts — nine tenths of Mixtral's parameters — that saves two passes over
/// every element per micro-batch.
/// </summary>
public sealed class GradientSink
{
    /// <param name="mainGradient">The fp32 view the gradient accumulates into, shaped like the weight.</param>
    public GradientSink(Tensor mainGradient) => MainGradient = mainGradient;

    /// <summary>The fp32 main gradient, shaped like the weight.</summary>
    public Tensor MainGradient { get; }

    /// <summary>True until the step's first gradient has arrived: the next one is copied, not added.</summary>
    public bool Fresh { get; set; } = true;

    /// <summary>Adds <paramref name="gradient"/> (the weight's dtype) to the main gradient, or copies it when fresh.</summary>
    public void Accumulate(Tensor gradient)
    {
        using var _ = torch.no_grad();
        if (Fresh) MainGradient.copy_(gradient);
        else MainGradient.add_(gradient);
        Fresh = false;
        Arrived?.Invoke(this);
    }

    /// <summary>
    /// Told after each gradient has been accumulated: the gradient buffer's readiness tracking for
    /// Training.OverlapGradReduce (TorchSharp has no autograd hooks; this is where Megatron's grad hook would fire).
    /// </summary>
    public Action<GradientSink>? Arrived { get; set; }
}

/// <summary>The sinks of one layer's experts (gate_up, down); <see cref="None"/> accumulates into <c>.grad</c>.</summary>
public sealed record ExpertGradientSinks(GradientSink? GateUp, GradientSink? Down)
{
    /// <summary>No sinks: weight gradients go to <c>.grad</c>.</summary>
    public static readonly ExpertGradientSinks None = new(null, null);
}
