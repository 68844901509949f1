namespace Moe.Dsl;

/// <summary>
/// Expert capacity. With no <see cref="Factor"/> the layer is dropless (Megatron's default): every
/// routed token is computed. With a factor each expert takes at most ceil(T·k/E·factor) tokens per
/// micro-batch on a rank and the rest are dropped by <see cref="DropPolicy"/>.
/// </summary>
public sealed record Capacity
{
    /// <summary>Capacity factor; null means dropless. Must be positive. Megatron: <c>--moe-expert-capacity-factor</c>.</summary>
    public double? Factor { get; init; }

    /// <summary>Which tokens an over-full expert keeps. Megatron: <c>--moe-token-drop-policy</c>.</summary>
    public DropPolicy DropPolicy { get; init; } = DropPolicy.Probs;

    /// <summary>Pad every expert's input to exactly its capacity (needs a factor). Megatron: <c>--moe-pad-expert-input-to-capacity</c>.</summary>
    public bool PadToCapacity { get; init; }

    /// <summary>
    /// The plan's assumption for dropless routing: the most loaded expert takes this multiple of its fair share
    /// (T·k/E), and so do the other experts of its expert-parallel rank, so that rank's experts receive up to
    /// min(skew·T·k, EP·T·min(k, E/EP)) rows (docs/memory.md). Default 1.5, the load imbalance
    /// <see cref="Health.MaxLoadImbalance"/> warns at: the tutorial warns that routing spikes after step 1 can run
    /// out of memory when step 1 left no headroom. Must be between 1 and E/k, the most a top-k router can give one
    /// expert (MOE0305). Not used with a <see cref="Factor"/>: capacity then gives the exact bound. Moe only;
    /// Megatron has no such setting.
    /// </summary>
    public double RoutingSkew { get; init; } = 1.5;

    /// <summary>The dropless setting (no factor).</summary>
    public static Capacity Dropless { get; } = new();
}
