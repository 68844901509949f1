using Moe.Runtime.Data;
using Moe.Runtime.Distributed;
using Moe.Runtime.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Training;

// Shapes: B samples, S the whole sequence, Sl = S / CP the tokens of each sample on this rank.

/// <summary>
/// One micro-batch as this rank trains it: the samples stacked into [B, S] and cut to this context-parallel rank's
/// tokens (<see cref="ContextParallel"/>; Megatron's <c>get_batch_on_this_cp_rank</c>) — tokens, labels, loss
/// mask, position ids (global, so RoPE sees the real positions) and document ids — and the counted positions of
/// this rank and of the whole micro-batch. Every cp rank reads the same samples and keeps its own chunks.
/// </summary>
/// <param name="TokensBS">Token ids [B, Sl].</param>
/// <param name="LabelsBS">Targets [B, Sl].</param>
/// <param name="LossMaskBS">1 where the loss counts [B, Sl].</param>
/// <param name="PositionIdsBS">RoPE positions [B, Sl].</param>
/// <param name="DocumentIdsBS">Documents [B, Sl] (reset attention mask), or null.</param>
/// <param name="LocalCounted">Positions the loss counts on this rank (mask &gt; 0, as cross-entropy counts them).</param>
/// <param name="WholeCounted">Positions the loss counts in the whole micro-batch (every cp rank's).</param>
public sealed record MicroBatch(Tensor TokensBS, Tensor LabelsBS, Tensor LossMaskBS, Tensor PositionIdsBS, Tensor? DocumentIdsBS, long LocalCounted, long WholeCounted)
{
    /// <summary>Stacks <paramref name="samples"/> (each <paramref name="sequence"/> long) and keeps this rank's chunks.</summary>
    /// <param name="samples">The micro-batch's samples.</param>
    /// <param name="sequence">S.</param>
    /// <param name="device">Where the tensors go.</param>
    /// <param name="cp">This rank's context parallel (size 1: everything).</param>
    /// <param name="documents">Whether attention stays inside documents (Data.ResetAttentionMask).</param>
    public static MicroBatch From(IReadOnlyList<GptSample> samples, int sequence, Device device, ContextParallel cp, bool documents)
    {
        int b = samples.Count;
        long local = sequence / cp.Size;
        T[] Whole<T>(Func<GptSample, T[]> f) => samples.SelectMany(f).ToArray();
        Tensor Long(Func<GptSample, long[]> f) => torch.tensor(cp.Shard(Whole(f), b), device: device).view(b, local);
        var maskWhole = Whole(x => x.LossMask);
        var mask = cp.Shard(maskWhole, b);
        return new MicroBatch(Long(x => x.Tokens), Long(x => x.Labels), torch.tensor(mask, device: device).view(b, local), Long(x => x.PositionIds),
            documents ? Long(x => x.DocumentIds) : null, mask.LongCount(m => m > 0), maskWhole.LongCount(m => m > 0));
    }

    /// <summary>These inputs for a pipeline stage (<see cref="PipelineRunner"/>), with the loss factor <see cref="Loss"/> applies.</summary>
    public MicroBatchInputs ForPipeline(ContextParallel cp) =>
        new(TokensBS, LabelsBS, LossMaskBS, PositionIdsBS, DocumentIdsBS, cp.LossFactor(LocalCounted, WholeCounted), LocalCounted == 0);

    /// <summary>This rank's summed lm loss (the mean <paramref name="lmLoss"/> times its counted positions, detached, fp64); 0 when none counts.</summary>
    public Tensor LmSum(Tensor lmLoss) =>
        LocalCounted == 0 ? torch.zeros(1, dtype: ScalarType.Float64, device: lmLoss.device).squeeze() : lmLoss.detach().to(ScalarType.Float64) * (double)LocalCounted;

    /// <summary>
    /// The loss this rank's backward starts from, before the division by the micro-batch count, in Megatron's
    /// scaling: <c>CP · (Σ_local ℓ / N_whole) + CP · (α_aux · aux_r + α_z / |tp_cp| · z_r)</c>. Dense gradients are
    /// averaged over data × context parallel, so the CP factor makes the cp group's gradients sum to those of the whole
    /// sequence: lm_loss token-weighted over every counted position of the micro-batch, the aux loss the sum of the
    /// ranks' shares (<c>aux_r</c>, counts reduced over tp_cp), the z-loss the mean of the ranks' means (Megatron divides
    /// its coefficient by the tp_cp size, router.py apply_z_loss). At CP 1 and TP 1 this is lm + α_aux·aux + α_z·z.
    /// </summary>
    /// <param name="output">The forward's output on this rank.</param>
    /// <param name="cp">This rank's context parallel.</param>
    /// <param name="tensorContext">The tp_cp group.</param>
    /// <param name="auxCoeff">α_aux (0 without load balancing).</param>
    /// <param name="zCoeff">α_z (0 without z-loss).</param>
    public Tensor Loss(ForwardOutput output, ContextParallel cp, Communicator tensorContext, double auxCoeff, double zCoeff)
    {
        // A rank whose chunks hold no counted position has a NaN mean (0/0); its share is zero, and so are its
        // cross-entropy gradients (nan_to_num passes none through the NaN).
        var lm = LocalCounted == 0 ? output.LmLoss!.nan_to_num(0.0) * 0.0 : output.LmLoss! * cp.LossFactor(LocalCounted, WholeCounted);
        var router = auxCoeff * output.AuxLoss;
        if (output.ZLoss is not null) router = router + zCoeff / tensorContext.Size * output.ZLoss;
        return cp.Size == 1 ? lm + router : lm + cp.Size * router;
    }
}
