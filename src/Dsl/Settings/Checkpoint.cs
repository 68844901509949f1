namespace Moe.Dsl;

/// <summary>Where weights come from and go to.</summary>
public sealed record Checkpoint
{
    /// <summary>A Hugging Face model directory (config.json + safetensors) or a Moe checkpoint to start from. Megatron: <c>--load</c>.</summary>
    public string? Load { get; init; }

    /// <summary>Directory to save checkpoints to. Megatron: <c>--save</c>.</summary>
    public string? Save { get; init; }

    /// <summary>Save every this many steps (needs <see cref="Save"/>). Megatron: <c>--save-interval</c>.</summary>
    public int? Interval { get; init; }
}
