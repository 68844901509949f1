using Moe.Dsl;
using Moe.Dsl.Planning;
using Moe.Runtime.Modeling;

namespace Moe.Runtime.Commands.Bench;

/// <summary>
/// The plan's memory estimate (<see cref="MemoryEstimate"/>, docs/memory.md) for what one <c>moe bench</c> run holds, so that
/// the bench prints estimate and measurement side by side. The bench is the recipe with the same model, layout, sequence,
/// micro-batch and recompute, and differs from training only where it holds less: without <c>--optimizer</c> no optimizer
/// state, and with <c>--main-grads false</c> gradients in bf16 (2 bytes a parameter) instead of fp32 main gradients. Its
/// random ids route about uniformly, so the activations are the estimate's uniform-routing figure.
/// </summary>
public static class BenchEstimate
{
    /// <summary>The total and each term, in GiB (2^30 bytes, as the bench reports memory).</summary>
    public sealed record Result(double Total, IReadOnlyDictionary<string, double> Terms);

    /// <summary>The recipe a bench request stands for (data and schedule settings that do not change memory left at defaults).</summary>
    public static RecipeSettings Settings(BenchCommand.Request r, MixtralConfig config)
    {
        var preset = BenchCommand.Preset(r.Model);
        int dp = r.Gpus / (r.Tensor * r.Context * r.Pipeline);
        return new RecipeSettings
        {
            Name = "bench",
            Model = preset with { Layers = r.Layers, MaxPositionEmbeddings = config.MaxPositionEmbeddings },
            Parallelism = new Parallelism
            {
                Gpus = r.Gpus, Tensor = r.Tensor, Pipeline = r.Pipeline, Context = r.Context, Expert = r.Expert,
                ExpertTensor = r.Tensor, SequenceParallel = r.Tensor > 1, Gpu = Gpu.H200,
            },
            Data = new Dsl.Data { SequenceLength = r.Seq },
            Training = new Dsl.Training
            {
                MicroBatchSize = r.MicroBatch,
                GlobalBatchSize = r.MicroBatch * r.MicroBatches * Math.Max(1, dp),
                Precision = r.Device == "cpu" ? Precision.Fp32 : Precision.Bf16,
            },
            Recompute = r.Recompute ?? Recompute.Off,
        };
    }

    /// <summary>The estimate's terms for what the bench holds.</summary>
    public static Result For(BenchCommand.Request r, MixtralConfig config)
    {
        var e = MemoryEstimate.For(Settings(r, config));
        double weightBytes = r.Device == "cpu" ? 4 : 2;
        var terms = new Dictionary<string, double>
        {
            ["weights"] = e.WeightsBytes,
            // fp32 main gradients (the estimate's term) or the parameters' own .grad in the compute dtype.
            ["gradients"] = r.MainGrads ? e.GradientsBytes : e.ParametersPerGpu * weightBytes,
            ["optimizer"] = r.Optimizer ? e.OptimizerBytes : 0,
            ["activations"] = e.ActivationsUniformBytes,
            // One layer's backward: ∂gate/up of its rows (at uniform routing, as the activations), and the gate/up weight
            // gradient before it lands in the fp32 main gradients (with --main-grads false it is the .grad, counted above).
            ["backward"] = (e.BackwardBytes - e.BackwardWeightGradientBytes) * Math.Min(1, e.RoutedRowsUniform / e.RoutedRows)
                + (r.MainGrads ? e.BackwardWeightGradientBytes : 0),
            ["overhead"] = e.OverheadBytes,
        };
        var gib = terms.ToDictionary(t => t.Key, t => t.Value / (1L << 30));
        return new Result(gib.Values.Sum(), gib);
    }
}
