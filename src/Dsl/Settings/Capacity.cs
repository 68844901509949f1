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

    /// <summary>The dropless setting (no factor).</summary>
    public static Capacity Dropless { get; } = new();
}
