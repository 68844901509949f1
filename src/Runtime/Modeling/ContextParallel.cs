using Moe.Dsl.Validation;
using Moe.Runtime.Distributed;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

// Shapes: B batch, S the whole sequence, Sl = S / CP this rank's tokens of each sequence, c = S / (2·CP) one chunk,
// N key-value heads (groups) on this rank, d head dim.

/// <summary>
/// Context parallelism as Megatron-Core runs it (Transformer Engine's attention with <c>cp_comm_type = "all_gather"</c>,
/// <c>AttnFuncWithCPAndKVAllGather</c>): every sequence is cut into 2·CP chunks and context-parallel rank r keeps
/// chunks r and 2·CP − 1 − r (<c>get_batch_on_this_cp_rank</c>, per-sequence zigzag), so each rank holds an early and
/// a late part and causal attention costs every rank the same. Everything per token — embedding, norms, projections,
/// the MoE layer, the loss — runs on the rank's Sl tokens only; attention all-gathers the keys and values of the
/// whole sequence over the cp group, and its backward reduce-scatters their gradients back (each rank's keys are
/// read by every rank's queries, so their gradient is the sum over the group).
/// </summary>
/// <remarks>
/// <para>
/// Positions are global: RoPE takes the sample's position ids sharded like the tokens (Megatron slices its rotary
/// table the same way), and the attention mask — causal, document (reset attention mask) and sliding window — is
/// built from the global sequence index of every query and key (<see cref="AttentionMask"/>). The gathered keys are
/// in rank order (rank 0's two chunks, then rank 1's, ...), not in sequence order; the mask carries the order, so
/// nothing is permuted. Unlike TE, which splits the local queries in two and attends each half to its causal
/// prefix only, one masked attention covers all Sl × S pairs (simpler, up to twice the attention FLOPs of TE's).
/// </para>
/// <para>
/// Losses and gradients: lm_loss is token-weighted over the whole sequence (each rank's sum of counted losses over
/// the counted tokens of all ranks, <see cref="LossFactor"/>), and every rank's losses are scaled by CP before the
/// backward because dense gradients are averaged over data × context parallel (Megatron's MoE aux-loss scale is
/// loss_scale·CP/M for the same reason). The router's load-balancing counts are summed over tensor × context
/// parallel (<see cref="MixtureOfExperts.LoadBalancingGroups"/>), so each rank's aux loss is its share of the whole
/// sequence's.
/// </para>
/// <para>
/// Size 1 is the identity (<see cref="Shard"/> returns its input). Per-document zigzag over packed sequences
/// (Megatron's THD path with cu_seqlens) and the p2p ring (<c>cp_comm_type = "p2p"</c>) are not implemented.
/// </para>
/// </remarks>
public sealed class ContextParallel
{
    /// <summary>Context parallel over <paramref name="group"/> (Megatron's CONTEXT_PARALLEL_GROUP).</summary>
    public ContextParallel(Communicator group) => Group = group;

    /// <summary>
    /// Applies context parallel to <paramref name="model"/> from outside (torchtitan's order: after the model is built,
    /// before its gradients are bucketed): every attention gathers keys and values over <paramref name="groups"/>' cp
    /// group, the model builds its masks and default positions from global indices, and every router sums its
    /// load-balancing counts over tp_cp (aux_loss, seq_aux_loss) and tp_dp_cp (global_aux_loss), as Megatron's router
    /// does. Returns this rank's context parallel; at size 1 only the load-balancing groups are set (each of one
    /// member without tensor or data parallelism).
    /// </summary>
    /// <exception cref="InvalidOperationException">
    /// CP &gt; 1 with transformers' aux-loss convention, whose loss over all layers is not split over ranks (recipes use
    /// Megatron's).
    /// </exception>
    public static ContextParallel Apply(MixtralModel model, ProcessGroups groups)
    {
        var cp = new ContextParallel(groups.Cp);
        var balancing = new MixtureOfExperts.LoadBalancingGroups(groups.TpCp, groups.TpDpCp);
        foreach (var layer in model.Layers) layer.Moe.LoadBalancingGroups = balancing;
        if (cp.Size == 1) return cp;
        var options = model.Layers[0].Moe.Options;
        if (options.LoadBalancing != Dsl.LoadBalancing.None && options.AuxLossConvention == MixtureOfExperts.AuxLossConvention.Transformers)
            throw new InvalidOperationException("Context parallel needs Megatron's aux-loss convention (each rank's share of the whole sequence's loss); transformers' is computed over all layers at once.");
        model.Context = cp;
        foreach (var layer in model.Layers) layer.SelfAttention.Context = cp;
        return cp;
    }

    /// <summary>The cp group.</summary>
    public Communicator Group { get; }

    /// <summary>CP.</summary>
    public int Size => Group.Size;

    /// <summary>This rank's index in the cp group.</summary>
    public int Rank => Group.Rank;

    /// <summary>
    /// The sequence indices rank <paramref name="rank"/> of <paramref name="size"/> holds, in its order: chunk
    /// <c>rank</c> then chunk <c>2·size − 1 − rank</c>, each of <c>sequence / (2·size)</c> tokens. Size 1: every index.
    /// </summary>
    public static long[] ChunkIndices(int sequence, int size, int rank)
    {
        CheckSequence(sequence, size);
        if ((uint)rank >= (uint)size) throw new ArgumentOutOfRangeException(nameof(rank), $"Context-parallel rank {rank} is not in [0, {size}).");
        if (size == 1) return Enumerable.Range(0, sequence).Select(i => (long)i).ToArray();
        int chunk = sequence / (2 * size);
        return Enumerable.Range(rank * chunk, chunk).Concat(Enumerable.Range((2 * size - 1 - rank) * chunk, chunk)).Select(i => (long)i).ToArray();
    }

    /// <summary>
    /// Refuses a sequence that does not cut into 2·CP chunks (rule MOE0206, Megatron R030): checked where the
    /// sequence is cut, so a layout or a sequence changed after validation cannot get past it.
    /// </summary>
    /// <param name="sequence">S.</param>
    /// <param name="size">CP.</param>
    /// <param name="setting">Where the user sets the sequence, named in the message.</param>
    public static void CheckSequence(int sequence, int size, string setting = "Data.SequenceLength (--seq-length)")
    {
        if (size < 1) throw new ArgumentOutOfRangeException(nameof(size), $"Context-parallel size {size} must be at least 1.");
        if (size == 1 || (sequence > 0 && sequence % (2 * size) == 0)) return;
        int lower = sequence / (2 * size) * (2 * size), upper = lower + 2 * size;
        throw new UserError($"{DiagnosticIds.SequenceNotDivisibleForContext}: the sequence ({sequence} tokens) must be a multiple of 2 × Context = {2 * size}: " +
            $"context parallel gives each of the {size} ranks two of {2 * size} equal chunks. Set {setting} to " +
            (lower > 0 ? $"{lower} or {upper}" : $"{upper}") + $", or change Parallelism.Context (--cp). See docs/diagnostics/{DiagnosticIds.SequenceNotDivisibleForContext}.md.");
    }

    /// <summary>This rank's sequence indices for sequences of <paramref name="sequence"/> tokens.</summary>
    public long[] LocalIndices(int sequence) => ChunkIndices(sequence, Size, Rank);

    /// <summary>The sequence indices of the gathered keys, [S]: every rank's <see cref="ChunkIndices"/> in rank order.</summary>
    public long[] GatheredIndices(int sequence) => Enumerable.Range(0, Size).SelectMany(r => ChunkIndices(sequence, Size, r)).ToArray();

    /// <summary>This rank's tokens of [B, S, …] along dim 1, [B, Sl, …] (the input itself at size 1).</summary>
    public Tensor Shard(Tensor wholeBS)
    {
        if (Size == 1) return wholeBS;
        using var index = torch.tensor(LocalIndices((int)wholeBS.shape[1]), device: wholeBS.device);
        return wholeBS.index_select(1, index);
    }

    /// <summary>This rank's elements of a row-major [B, S] host array, [B·Sl] row-major.</summary>
    public T[] Shard<T>(T[] wholeBS, int batch)
    {
        int sequence = wholeBS.Length / batch;
        if (Size == 1) return wholeBS;
        var local = LocalIndices(sequence);
        var result = new T[batch * local.Length];
        for (int b = 0; b < batch; b++)
            for (int i = 0; i < local.Length; i++) result[b * local.Length + i] = wholeBS[b * sequence + local[i]];
        return result;
    }

    /// <summary>
    /// Keys and values of the whole sequence: this rank's [B, N, Sl, d] all-gathered over the cp group into
    /// [B, N, S, d] in rank order (<see cref="GatheredIndices"/>), in one collective for both; backward
    /// reduce-scatters their gradients (<see cref="AllGatherRowsFunction"/>).
    /// </summary>
    public (Tensor KeysBNSd, Tensor ValuesBNSd) GatherKeysValues(Tensor keysBNSd, Tensor valuesBNSd)
    {
        if (Size == 1) return (keysBNSd, valuesBNSd);
        long local = keysBNSd.shape[2];
        // Sequence first so that a rank's tokens are one block of rows: [Sl, 2, B, N, d].
        var rowsL2BNd = torch.stack([keysBNSd, valuesBNSd]).permute(3, 0, 1, 2, 4);
        var gatheredS2BNd = AllGatherRowsFunction.Apply(rowsL2BNd.contiguous(), Group, Enumerable.Repeat(local, Size).ToArray());
        var both2BNSd = gatheredS2BNd.permute(1, 2, 3, 0, 4);
        return (both2BNSd[0], both2BNSd[1]);
    }

    /// <summary>
    /// The attention mask of this rank's queries over the gathered keys, boolean [B or 1, 1, Sl, S] (true = attend),
    /// from global sequence indices: causal (key index ≤ query index), inside the query's document when
    /// <paramref name="documentIdsBS"/> (this rank's, [B, Sl]) is given — the documents of the other ranks' tokens are
    /// all-gathered — and within <paramref name="slidingWindow"/> (query − window &lt; key) when set. Every query
    /// sees at least itself.
    /// </summary>
    public Tensor AttentionMask(long localSequence, Tensor? documentIdsBS, int? slidingWindow, Device device)
    {
        int sequence = checked((int)localSequence * Size);
        var queryL1 = torch.tensor(LocalIndices(sequence), device: device).unsqueeze(1);
        var key1S = torch.tensor(GatheredIndices(sequence), device: device).unsqueeze(0);
        var maskLS = key1S.le(queryL1);
        if (slidingWindow is int window) maskLS = maskLS & key1S.gt(queryL1 - window);
        if (documentIdsBS is null) return maskLS.view(1, 1, localSequence, sequence);
        long b = documentIdsBS.shape[0];
        var documentsSB = torch.empty(sequence, b, dtype: documentIdsBS.dtype, device: documentIdsBS.device);
        Group.AllGather(documentIdsBS.t().contiguous(), documentsSB);
        var sameBLS = documentIdsBS.unsqueeze(2).eq(documentsSB.t().unsqueeze(1));
        return (sameBLS & maskLS.unsqueeze(0)).unsqueeze(1);
    }

    /// <summary>
    /// The factor that turns this rank's lm_loss (the mean over its own counted tokens) into its share of the
    /// micro-batch's loss as the backward needs it: CP · local / whole, so that the gradients, averaged over the cp
    /// group, are those of the mean over every counted token of the sequences. 0 when nothing in the micro-batch counts.
    /// </summary>
    /// <param name="localCounted">Counted positions on this rank.</param>
    /// <param name="wholeCounted">Counted positions of the whole micro-batch (every cp rank's).</param>
    public double LossFactor(long localCounted, long wholeCounted) => wholeCounted == 0 ? 0 : (double)Size * localCounted / wholeCounted;
}
