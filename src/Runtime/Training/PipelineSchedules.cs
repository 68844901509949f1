namespace Moe.Runtime.Training;

/// <summary>What a pipeline stage does next: the forward or the backward of one micro-batch through one of its model chunks.</summary>
/// <param name="Backward">False for a forward, true for a backward.</param>
/// <param name="MicroBatch">The micro-batch, 0 … M − 1.</param>
/// <param name="Chunk">The model chunk (virtual stage of this rank), 0 … chunks − 1; always 0 without a virtual pipeline.</param>
public readonly record struct PipelineAction(bool Backward, int MicroBatch, int Chunk)
{
    /// <summary>"F3" or "B3.1" (micro-batch 3 through chunk 1): the notation of the schedule tests.</summary>
    public override string ToString() => (Backward ? "B" : "F") + MicroBatch + (Chunk == 0 ? "" : "." + Chunk);

    /// <summary>A forward.</summary>
    public static PipelineAction F(int microBatch, int chunk = 0) => new(false, microBatch, chunk);

    /// <summary>A backward.</summary>
    public static PipelineAction B(int microBatch, int chunk = 0) => new(true, microBatch, chunk);
}

/// <summary>
/// The order in which one pipeline stage runs its forwards and backwards, as Megatron-Core's schedules run them
/// (megatron/core/pipeline_parallel/schedules.py): forward_backward_pipelining_without_interleaving (1F1B) and
/// forward_backward_pipelining_with_interleaving (a virtual pipeline of several model chunks per rank). The
/// communication follows from the order (<see cref="PipelineRunner"/>): a forward needs its input from the previous
/// virtual stage, a backward its output gradient from the next.
/// </summary>
/// <remarks>
/// <para>
/// 1F1B: warm-up min(pp − stage − 1, M) forwards, then one forward and one backward in turn, then the remaining
/// backwards (cool-down). Stage s therefore holds at most pp − s micro-batches' activations.
/// </para>
/// <para>
/// Interleaved, with v chunks: M·v virtual micro-batches; virtual micro-batch k is micro-batch
/// (k div (pp·v))·pp + k mod pp through chunk (k mod (pp·v)) div pp forward, and through chunk v − 1 − that
/// backward (Megatron's schedule table with microbatch_group_size_per_vp_stage = pp, its default). Warm-up
/// (pp − stage − 1)·2 + (v − 1)·pp, capped at M·v; all M·v when M = pp. Megatron requires M ≥ pp and
/// M mod pp = 0 (rule R051, MOE0203 in the rule set); fewer is a <see cref="UserError"/> here too, since
/// overrides can reach the schedule without the rule set.
/// </para>
/// <para>Forward-only (evaluation): every forward in order, chunk by chunk as the interleaved table orders them.</para>
/// </remarks>
public static class PipelineSchedules
{
    /// <summary>The actions of <paramref name="stage"/>, in order.</summary>
    /// <param name="stages">Pipeline-parallel size (pp).</param>
    /// <param name="stage">This rank's stage, 0 … pp − 1.</param>
    /// <param name="microBatches">Micro-batches per step (M).</param>
    /// <param name="chunks">Model chunks per rank (virtual pipeline size; 1 for 1F1B).</param>
    /// <param name="forwardOnly">Forwards only (evaluation).</param>
    public static IReadOnlyList<PipelineAction> For(int stages, int stage, int microBatches, int chunks = 1, bool forwardOnly = false)
    {
        if (stages < 1 || stage < 0 || stage >= stages) throw new ArgumentOutOfRangeException(nameof(stage), $"stage {stage} of {stages}");
        if (microBatches < 1) throw new UserError($"A pipeline step needs at least one micro-batch, got {microBatches}.");
        if (chunks < 1) throw new ArgumentOutOfRangeException(nameof(chunks));
        return chunks == 1 ? OneForwardOneBackward(stages, stage, microBatches, forwardOnly) : Interleaved(stages, stage, microBatches, chunks, forwardOnly);
    }

    /// <summary>Forwards before the first backward on <paramref name="stage"/> (Megatron's num_warmup_microbatches, in virtual micro-batches).</summary>
    public static int WarmupCount(int stages, int stage, int microBatches, int chunks = 1)
    {
        if (chunks == 1) return Math.Min(stages - stage - 1, microBatches);
        int total = microBatches * chunks;
        if (microBatches == stages) return total;   // all forwards, then all backwards
        return Math.Min((stages - stage - 1) * 2 + (chunks - 1) * stages, total);
    }

    /// <summary>
    /// The micro-batch and chunk of virtual micro-batch <paramref name="k"/> (Megatron's get_schedule_table with
    /// groups of pp micro-batches, and get_model_chunk_id: backwards run the chunks in reverse).
    /// </summary>
    public static (int MicroBatch, int Chunk) Virtual(int k, int stages, int chunks, bool backward)
    {
        int round = stages * chunks;
        int microBatch = k / round * stages + k % stages;
        int chunk = k % round / stages;
        return (microBatch, backward ? chunks - 1 - chunk : chunk);
    }

    private static List<PipelineAction> OneForwardOneBackward(int stages, int stage, int m, bool forwardOnly)
    {
        var actions = new List<PipelineAction>(2 * m);
        if (forwardOnly)
        {
            for (int i = 0; i < m; i++) actions.Add(PipelineAction.F(i));
            return actions;
        }
        int warmup = WarmupCount(stages, stage, m);
        for (int i = 0; i < warmup; i++) actions.Add(PipelineAction.F(i));
        for (int i = 0; i < m - warmup; i++)
        {
            actions.Add(PipelineAction.F(warmup + i));
            actions.Add(PipelineAction.B(i));
        }
        for (int i = m - warmup; i < m; i++) actions.Add(PipelineAction.B(i));
        return actions;
    }

    private static List<PipelineAction> Interleaved(int stages, int stage, int m, int chunks, bool forwardOnly)
    {
        if (m < stages || m % stages != 0)
            throw new UserError($"The interleaved pipeline schedule (VirtualPipeline = {chunks}) needs the micro-batches per step to be at least Pipeline ({stages}) and a multiple of it, " +
                $"as Megatron-Core requires; this step has {m}. Set GlobalBatchSize / (MicroBatchSize × data parallel) to a multiple of {stages}, or remove VirtualPipeline (rule MOE0203).");
        int total = m * chunks;
        var actions = new List<PipelineAction>(2 * total);
        PipelineAction Forward(int k) { var (mb, c) = Virtual(k, stages, chunks, false); return PipelineAction.F(mb, c); }
        PipelineAction Backward(int k) { var (mb, c) = Virtual(k, stages, chunks, true); return PipelineAction.B(mb, c); }
        if (forwardOnly)
        {
            for (int k = 0; k < total; k++) actions.Add(Forward(k));
            return actions;
        }
        int warmup = WarmupCount(stages, stage, m, chunks);
        for (int k = 0; k < warmup; k++) actions.Add(Forward(k));
        for (int i = 0; i < total - warmup; i++)
        {
            actions.Add(Forward(warmup + i));
            actions.Add(Backward(i));
        }
        for (int k = total - warmup; k < total; k++) actions.Add(Backward(k));
        return actions;
    }
}
