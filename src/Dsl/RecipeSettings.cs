using System;
using System.Collections.Generic;
using System.Linq;

namespace Moe.Dsl;

/// <summary>
/// Every setting of a recipe as plain values: what the rule set validates and the planner plans.
/// Built from a live <see cref="Recipe"/> at run time (<see cref="Recipe.ToSettings"/>), or by the
/// analyzer from a recipe's syntax, in which case <see cref="Unknown"/> lists the setting paths whose
/// values are not compile-time constants; rules that read them are left to start-up.
/// </summary>
public sealed record RecipeSettings
{
    /// <summary>The recipe's class name.</summary>
    public string Name { get; init; } = "recipe";

    /// <summary>The model architecture.</summary>
    public Model Model { get; init; } = Model.TinyMixtral;

    /// <summary>GPU layout.</summary>
    public Parallelism Parallelism { get; init; } = new();

    /// <summary>Router settings.</summary>
    public Router Router { get; init; } = new();

    /// <summary>Expert capacity.</summary>
    public Capacity Capacity { get; init; } = Capacity.Dropless;

    /// <summary>Token dispatcher.</summary>
    public TokenDispatcher Dispatcher { get; init; } = TokenDispatcher.AllToAll;

    /// <summary>Training data.</summary>
    public Data Data { get; init; } = new();

    /// <summary>Optimisation settings.</summary>
    public Training Training { get; init; } = new();

    /// <summary>Checkpoint load/save.</summary>
    public Checkpoint Checkpoint { get; init; } = new();

    /// <summary>NCCL environment.</summary>
    public Nccl Nccl { get; init; } = new();

    /// <summary>Training-health checks and TensorBoard.</summary>
    public Health Health { get; init; } = new();

    /// <summary>Activation recompute.</summary>
    public Recompute Recompute { get; init; } = Recompute.Off;

    /// <summary>Setting paths (e.g. "Parallelism.Gpus", "Model") whose values could not be evaluated at compile time.</summary>
    public IReadOnlyCollection<string> Unknown { get; init; } = Array.Empty<string>();

    /// <summary>The effective router top-k: <see cref="Router.TopK"/>, else the model's experts per token.</summary>
    public int TopK => Router.TopK ?? Model.ExpertsPerToken;

    /// <summary>The effective load-balancing coefficient: <see cref="Router.AuxLossCoeff"/>, else the model's.</summary>
    public double AuxLossCoeff => Router.AuxLossCoeff ?? Model.RouterAuxLossCoef;

    /// <summary>
    /// Micro-batches per optimizer step on each data-parallel rank: GlobalBatchSize / (MicroBatchSize × DataParallel);
    /// 0 when it does not divide.
    /// </summary>
    public int GradientAccumulationSteps
    {
        get
        {
            long perStep = (long)Training.MicroBatchSize * Parallelism.DataParallel;
            return perStep > 0 && Training.GlobalBatchSize % perStep == 0 ? (int)(Training.GlobalBatchSize / perStep) : 0;
        }
    }

    /// <summary>True when <paramref name="path"/> (or a setting that contains it, or one inside it) was not evaluated.</summary>
    public bool IsUnknown(string path) =>
        Unknown.Any(u => u == path
            || path.StartsWith(u + ".", StringComparison.Ordinal)
            || u.StartsWith(path + ".", StringComparison.Ordinal));
}
