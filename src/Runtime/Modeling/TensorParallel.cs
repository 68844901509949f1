using Moe.Runtime.Distributed;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

// Shapes: B batch, S sequence, s = S / TP positions of the sequence-parallel shard, H hidden, V vocabulary,
// v = V / TP vocabulary rows of this rank, T = B·S tokens, TP tensor-parallel size.

/// <summary>
/// Tensor and sequence parallelism of one rank, applied from outside the single-device model (Megatron-Core's
/// <c>tensor_parallel/layers.py</c> and <c>mappings.py</c>; Shoeybi et al. 2019, "Megatron-LM",
/// arXiv:1909.08053, and Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
/// Models", arXiv:2205.05198, for sequence parallel). At size 1 every method is the identity, so the one-device
/// model runs the same code.
/// </summary>
/// <remarks>
/// <para>
/// With sequence parallel, the activations between the tensor-parallel regions (embedding output, residual stream,
/// norms, the MoE layer's input and output) hold this rank's s = S/TP positions of every sequence — Megatron keeps
/// them as [S, B, H] and splits the first dimension; here the residual stream is [B, s, H], positions
/// [rank·s, (rank+1)·s) of each sequence. Around each region:
/// </para>
/// <list type="table">
/// <item><term>column-parallel in (q/k/v, LM head)</term><description><see cref="GatherSequence"/>: all-gather along
/// the sequence; backward reduce-scatter (gather_from_sequence_parallel_region);</description></item>
/// <item><term>row-parallel out (o_proj)</term><description><see cref="ReduceScatterSequence"/>: sum of the partial
/// outputs, each rank keeping its positions; backward all-gather (reduce_scatter_to_sequence_parallel_region);</description></item>
/// <item><term>embedding</term><description><see cref="Embed"/>: VocabParallelEmbedding — each rank holds rows
/// [rank·v, (rank+1)·v), looks up the ids in its range (others give zero) and the partial embeddings are
/// reduce-scattered along the sequence;</description></item>
/// <item><term>loss</term><description><see cref="CrossEntropy"/>: vocab-parallel cross-entropy — max, sum of exp and
/// target logit each all-reduced over TP, so no rank materialises [T, V].</description></item>
/// </list>
/// <para>
/// Parameters that stay whole on every tensor rank — the RMSNorm weights and the router — see only this rank's
/// positions under sequence parallel, so their gradients are summed over TP once the micro-batches are done
/// (Megatron's finalize_model_grads, <c>_allreduce_non_tensor_model_parallel_grads</c>; see
/// <see cref="IsReplicated"/>), and the gradient norm counts them on the first tensor rank only.
/// Without sequence parallel an MoE model cannot train under TP (rule MOE0010, Megatron R026), so this runtime
/// implements TP with sequence parallel only.
/// </para>
/// </remarks>
public sealed class TensorParallel
{
    private readonly Communicator? _group;

    private TensorParallel(Communicator? group, int keyValueReplicas = 1)
    {
        _group = group;
        KeyValueReplicas = keyValueReplicas;
    }

    /// <summary>The tensor parallelism of <paramref name="plan"/>'s rank (the identity without a plan or at TP 1).</summary>
    public static TensorParallel For(ParallelPlan? plan, MixtralConfig config)
    {
        if (plan is null || plan.Groups.Tp.Size == 1) return new TensorParallel(null);
        int tp = plan.Groups.Tp.Size;
        if (!plan.SequenceParallel)
            throw new UserError($"Tensor ({tp}) > 1 runs with SequenceParallel = true only: an MoE layer under tensor parallel needs it (rule MOE0010, Megatron R026); pass --sequence-parallel true.");
        if (config.VocabSize % tp != 0)
            throw new UserError($"The vocabulary ({config.VocabSize} tokens) must be a multiple of Tensor ({tp}): each tensor rank holds VocabSize / Tensor rows of the embedding and LM head " +
                $"({config.VocabSize} / {tp} = {config.VocabSize / (double)tp:G4}); choose Tensor dividing {config.VocabSize} or pad the tokenizer's vocabulary to a multiple of {tp}.");
        CheckHeads(config, tp);
        return new TensorParallel(plan.Groups.Tp, Math.Max(1, tp / config.KeyValueHeads));
    }

    /// <summary>
    /// Tensor sizes the attention of <paramref name="config"/> can be split over: divisors of the heads that divide the
    /// key-value heads or are a multiple of them (Megatron R014, R016, R017).
    /// </summary>
    public static IEnumerable<int> ValidSizes(MixtralConfig config) => Enumerable.Range(1, config.Heads).Where(t => SplitsHeads(config, t));

    /// <summary>Refuses a tensor size the attention cannot be split over (not among <see cref="ValidSizes"/>), naming the valid ones.</summary>
    internal static void CheckHeads(MixtralConfig config, int tp)
    {
        if (!SplitsHeads(config, tp))
            throw new UserError($"Tensor ({tp}) must divide the {config.Heads} attention heads, and Tensor and the {config.KeyValueHeads} key-value heads must divide one another " +
                $"(each tensor rank holds whole key-value groups, or one replicated group when Tensor exceeds them; rules MOE0006/MOE0007, Megatron R014, R016, R017): " +
                $"choose Tensor among {string.Join(", ", ValidSizes(config))}.");
    }

    private static bool SplitsHeads(MixtralConfig config, int tp) =>
        config.Heads % tp == 0 && (config.KeyValueHeads % tp == 0 || tp % config.KeyValueHeads == 0);

    /// <summary>The tensor-parallel group (TP &gt; 1 only).</summary>
    public Communicator Group => _group ?? throw new InvalidOperationException("No tensor-parallel group at TP 1.");

    /// <summary>TP.</summary>
    public int Size => _group?.Size ?? 1;

    /// <summary>This rank's index in the tensor-parallel group.</summary>
    public int Rank => _group?.Rank ?? 0;

    /// <summary>
    /// Tensor ranks holding each key-value group: TP / Nkv when TP exceeds the key-value heads (Megatron R017: each rank
    /// holds one group, replicated over TP / Nkv consecutive ranks), else 1.
    /// </summary>
    public int KeyValueReplicas { get; }

    /// <summary>The key-value group this rank holds a replica of (meaningful when <see cref="KeyValueReplicas"/> &gt; 1).</summary>
    public int KeyValueGroup => Rank / KeyValueReplicas;

    /// <summary>This rank's rows of a vocabulary of <paramref name="vocab"/> tokens: [First, First + Count).</summary>
    public (long First, long Count) VocabRange(long vocab) => (Rank * (vocab / Size), vocab / Size);

    /// <summary>Positions of a sequence of <paramref name="sequence"/> on this rank (s = S / TP).</summary>
    public long LocalSequence(long sequence)
    {
        if (sequence % Size != 0)
            throw new UserError($"With sequence parallel the sequence ({sequence} tokens) must be a multiple of Tensor ({Size}) (rule MOE0207, Megatron R029): choose a SequenceLength that Tensor divides.");
        return sequence / Size;
    }

    /// <summary>
    /// Whether a parameter is held whole on every tensor rank while its gradient comes from this rank's positions
    /// only (the norms and the router): its gradient is summed over TP. Sharded parameters (q/k/v, o_proj,
    /// embedding, LM head) and the experts (reduced over expert data parallel) are not.
    /// </summary>
    public bool IsReplicated(ModelParameter p) => Size > 1 && !p.IsExpert && p.Shard.IsWhole;

    /// <summary>Whether this rank counts <paramref name="p"/> in the gradient norm: a replicated parameter on the first tensor rank only.</summary>
    public bool CountsInNorm(ModelParameter p) => !IsReplicated(p) || Rank == 0;

    /// <summary>This rank's block of a [V, H] embedding or LM head.</summary>
    public TensorShard VocabShard(long vocab, long hidden)
    {
        var (first, count) = VocabRange(vocab);
        return new TensorShard([vocab, hidden], [count, hidden], [first, 0]);
    }

    /// <summary>
    /// This rank's block of the grouped q/k/v weight [Nkv·(r + 2)·d, H]: its whole key-value groups, one contiguous run of
    /// rows (the grouped layout puts each group's query, key and value rows together).
    /// </summary>
    public TensorShard QkvShard(Attention a, int keyValueHeads, long hidden)
    {
        if (KeyValueReplicas > 1) throw new InvalidOperationException("With replicated key-value heads the q/k/v weight is two blocks (QkvPieces).");
        long rows = (long)(a.QueryHeadsPerGroup + 2) * a.HeadDim;
        return new TensorShard([keyValueHeads * rows, hidden], [a.Groups * rows, hidden], [Rank * a.Groups * rows, 0]);
    }

    /// <summary>
    /// Replicated key-value heads (<see cref="KeyValueReplicas"/> &gt; 1): this rank's q/k/v weight [(Nq/TP + 2)·d, H] as two
    /// row blocks of the whole [Nkv·(R + 2)·d, H] (R = Nq/Nkv): the rows of its Nq/TP query heads inside group
    /// k = <see cref="KeyValueGroup"/>, then that group's key and value rows, which the group's other ranks hold too.
    /// </summary>
    public IReadOnlyList<ShardPiece> QkvPieces(Attention a, int heads, int keyValueHeads, long hidden)
    {
        long d = a.HeadDim, wholeR = heads / keyValueHeads, groupRows = (wholeR + 2) * d, local = a.QueryHeadsPerGroup;
        long groupStart = KeyValueGroup * groupRows, replica = Rank % KeyValueReplicas;
        long[] whole = [keyValueHeads * groupRows, hidden];
        var query = new TensorShard(whole, [local * d, hidden], [groupStart + replica * local * d, 0]);
        var keyValue = new TensorShard(whole, [2 * d, hidden], [groupStart + wholeR * d, 0]);
        return
        [
            new ShardPiece(0, local * d * hidden, query),
            new ShardPiece(local * d * hidden, 2 * d * hidden, keyValue, KeyValueGroup, (int)replica, KeyValueReplicas),
        ];
    }

    /// <summary>This rank's columns of o_proj [H, Nq·d]: the input columns of its query heads.</summary>
    public TensorShard OutputShard(Attention a, int heads, long hidden)
    {
        long local = (long)a.Groups * a.QueryHeadsPerGroup * a.HeadDim;
        return new TensorShard([hidden, (long)heads * a.HeadDim], [hidden, local], [0, Rank * local]);
    }

    /// <summary>
    /// All-gather along the sequence before a column-parallel projection: [B, s, H] → [B, S, H]; backward
    /// reduce-scatters the gradient (each rank's partial input gradient summed, its positions kept).
    /// </summary>
    public Tensor GatherSequence(Tensor xBsH)
    {
        if (Size == 1) return xBsH;
        long s = xBsH.shape[1];
        var gathered = AllGatherRowsFunction.Apply(xBsH.transpose(0, 1).contiguous(), Group, Equal(s));   // [S, B, H]
        return gathered.transpose(0, 1);
    }

    /// <summary>
    /// Reduce-scatter along the sequence after a row-parallel projection: partial sums [B, S, H] → this rank's
    /// positions of their sum [B, s, H]; backward all-gathers the gradient.
    /// </summary>
    public Tensor ReduceScatterSequence(Tensor partialBSH)
    {
        if (Size == 1) return partialBSH;
        long s = LocalSequence(partialBSH.shape[1]);
        var mine = ReduceScatterRowsFunction.Apply(partialBSH.transpose(0, 1).contiguous(), Group, Equal(s));   // [s, B, H]
        return mine.transpose(0, 1).contiguous();   // the residual stream stays contiguous (a copy only when B > 1)
    }

    /// <summary>
    /// VocabParallelEmbedding with sequence parallel: each rank looks up the ids of its vocabulary rows (others give
    /// zero rows), and the partial embeddings are summed and scattered along the sequence. Returns [B, s, H].
    /// </summary>
    public Tensor Embed(Parameter weightVH, Tensor idsBS)
    {
        long b = idsBS.shape[0], s = idsBS.shape[1], h = weightVH.shape[1];
        if (Size == 1) return weightVH.index_select(0, idsBS.flatten()).view(b, s, h);
        long vocab = weightVH.shape[0] * Size;
        var (first, count) = VocabRange(vocab);
        var outside = idsBS.lt(first) | idsBS.ge(first + count);
        var localIds = (idsBS - first).masked_fill(outside, 0);
        var partialBSH = weightVH.index_select(0, localIds.flatten()).view(b, s, h).masked_fill(outside.unsqueeze(-1), 0.0);
        return ReduceScatterSequence(partialBSH);
    }

    /// <summary>
    /// Vocab-parallel cross-entropy (Megatron's _VocabParallelCrossEntropy), mean over the targets that are not
    /// <paramref name="ignoreIndex"/>: loss_t = log Σ_v exp(z_tv − m_t) − (z_t,y − m_t) with m the global max. The
    /// max is all-reduced as a constant (the loss does not depend on it); Σ exp and the target logit are summed over
    /// TP by an all-reduce whose backward is the identity, so each rank's gradient is softmax − one-hot on its own
    /// vocabulary columns, exactly the one-device gradient's block. Every rank returns the same loss.
    /// </summary>
    /// <param name="logitsTv">This rank's logits, fp32 [T, v].</param>
    /// <param name="targetsT">Global token ids, int64 [T].</param>
    /// <param name="ignoreIndex">Targets not counted.</param>
    public Tensor CrossEntropy(Tensor logitsTv, Tensor targetsT, long ignoreIndex)
    {
        if (Size == 1) return nn.functional.cross_entropy(logitsTv, targetsT, ignore_index: ignoreIndex);
        long v = logitsTv.shape[1], first = Rank * v;
        Tensor maxT;
        using (torch.no_grad())
        {
            maxT = logitsTv.amax([1]).contiguous();
            Group.AllReduce(maxT, ReduceOp.Max);
        }
        var shiftedTv = logitsTv - maxT.unsqueeze(1);
        var sumExpT = ReduceFromGroupFunction.Apply(shiftedTv.exp().sum([1]), Group);
        var outside = targetsT.lt(first) | targetsT.ge(first + v);
        var localT = (targetsT - first).masked_fill(outside, 0);
        var targetLogitT = ReduceFromGroupFunction.Apply(shiftedTv.gather(1, localT.unsqueeze(1)).squeeze(1).masked_fill(outside, 0.0), Group);
        var counted = targetsT.ne(ignoreIndex);
        var lossT = (sumExpT.log() - targetLogitT).masked_fill(counted.logical_not(), 0.0);
        return lossT.sum() / counted.sum().to(lossT.dtype);
    }

    /// <summary>The whole vocabulary's logits from every rank's columns [.., v] → [.., V] (no gradient: for callers that asked for logits).</summary>
    public Tensor GatherVocabulary(Tensor logitsXv)
    {
        if (Size == 1) return logitsXv;
        using var _ = torch.no_grad();
        var shape = logitsXv.shape;
        long v = shape[^1], rows = logitsXv.numel() / v;
        var all = torch.empty([Size * rows, v], dtype: logitsXv.dtype, device: logitsXv.device);
        Group.AllGather(logitsXv.reshape(rows, v).contiguous(), all);
        long[] whole = [.. shape[..^1], Size * v];
        return all.view(Size, rows, v).permute(1, 0, 2).reshape(whole);
    }

    /// <summary>
    /// Sums the gradients of the replicated parameters (<see cref="IsReplicated"/>) over TP in <paramref name="mainGrad"/>
    /// (one all-reduce of them packed together), as Megatron's finalize_model_grads does for sequence-parallel weights,
    /// and the gradients of the blocks held by a subset of the ranks (<paramref name="shared"/>: replicated key-value
    /// heads) over that subset: in the same all-reduce each such block has one slot per set of ranks
    /// (<see cref="ShardPiece.Set"/>), a rank adds its gradient to its set's slot only and reads that slot back.
    /// </summary>
    /// <param name="mainGrad">A flat gradient buffer.</param>
    /// <param name="ranges">(offset, elements) of each replicated parameter's gradient in it.</param>
    /// <param name="shared">(offset in the buffer, piece) of each shared block; the same pieces in the same order on every tensor rank.</param>
    public void SumReplicatedGradients(Tensor mainGrad, IReadOnlyList<(long Offset, long Length)> ranges, IReadOnlyList<(long Offset, ShardPiece Piece)>? shared = null)
    {
        shared ??= [];
        if (Size == 1 || ranges.Count + shared.Count == 0) return;
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        long replicatedLength = ranges.Sum(r => r.Length);
        long total = replicatedLength + shared.Sum(s => s.Piece.Length * (Size / s.Piece.Replicas));
        var packed = torch.zeros(total, dtype: mainGrad.dtype, device: mainGrad.device);
        long at = 0;
        foreach (var (offset, length) in ranges)
        {
            packed.narrow(0, at, length).copy_(mainGrad.narrow(0, offset, length));
            at += length;
        }
        var slots = new List<long>(shared.Count);
        foreach (var (offset, piece) in shared)
        {
            long slot = at + piece.Set * piece.Length;
            packed.narrow(0, slot, piece.Length).copy_(mainGrad.narrow(0, offset, piece.Length));
            slots.Add(slot);
            at += piece.Length * (Size / piece.Replicas);
        }
        Group.AllReduce(packed);
        at = 0;
        foreach (var (offset, length) in ranges)
        {
            mainGrad.narrow(0, offset, length).copy_(packed.narrow(0, at, length));
            at += length;
        }
        for (int i = 0; i < shared.Count; i++)
            mainGrad.narrow(0, shared[i].Offset, shared[i].Piece.Length).copy_(packed.narrow(0, slots[i], shared[i].Piece.Length));
    }

    private long[] Equal(long rows) => Enumerable.Repeat(rows, Size).ToArray();
}
