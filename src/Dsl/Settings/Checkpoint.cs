namespace Moe.Dsl;

/// <summary>Where weights come from and go to.</summary>
public sealed record Checkpoint
{
    /// <summary>
    /// Where to start from: a save folder (its latest checkpoint), one <c>iter_NNNNNNN</c> checkpoint folder (both resume
    /// exactly: step, schedule, optimizer moments, data order), or a Hugging Face model folder (weights only). Megatron: <c>--load</c>.
    /// </summary>
    public string? Load { get; init; }

    /// <summary>Directory to save checkpoints to. Megatron: <c>--save</c>.</summary>
    public string? Save { get; init; }

    /// <summary>Save every this many steps (needs <see cref="Save"/>); the last step is always saved. Megatron: <c>--save-interval</c>.</summary>
    public int? Interval { get; init; }

    /// <summary>
    /// After each complete save, keep only the newest this many checkpoints in <see cref="Save"/> up to the one just saved
    /// (newer ones, left by another run, are never deleted); null keeps all. Megatron has none (its users prune by hand);
    /// torchtitan: <c>checkpoint.keep_latest_k</c>.
    /// </summary>
    public int? KeepLast { get; init; }
}
