using System;

namespace Moe.Dsl;

/// <summary>
/// Marks a class deriving from <see cref="Recipe"/> as a training recipe. The Moe analyzers check
/// it at compile time and the Moe generators emit its parallel-group wiring and entry point.
/// </summary>
[AttributeUsage(AttributeTargets.Class, AllowMultiple = false, Inherited = false)]
public sealed class RecipeAttribute : Attribute
{
    /// <summary>The default of <see cref="WiringTableLimit"/>.</summary>
    public const int DefaultWiringTableLimit = 256;

    /// <summary>
    /// Up to this many GPUs the generated <c>Wiring</c> lists every process group, each rank's coordinates and
    /// the communicator creation runs as tables a review can read; above it, it states the two rank grids
    /// (sizes and strides) and computes every group from them (docs/architecture.md says why 256). 0 or less:
    /// always computed. A generator setting only: it changes no group and nothing Megatron-Core knows of.
    /// </summary>
    public int WiringTableLimit { get; set; } = DefaultWiringTableLimit;
}
