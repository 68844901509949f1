using Moe.Dsl;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shape legend
//   T  tokens on this rank (B·S, batch-major)        H  hidden size
//   E  experts                                        K  router top-k
//   R  rows sent to the experts: one per kept (token, expert) pair, plus padding rows; R = T·K when dropless
//   C  capacity per expert, ceil(T·K/E · capacity factor)

/// <summary>Token rows grouped by expert, and how to put the experts' outputs back.</summary>
/// <param name="RowsRH">Hidden states of the routed (token, expert) pairs, sorted by expert (stable: token order inside an expert).</param>
/// <param name="TokenOfRowR">The token each row came from.</param>
/// <param name="WeightOfRowR">The combine weight of each row (0 for padding rows).</param>
/// <param name="RowsPerExpertE">Rows per expert (int64, on the device).</param>
/// <param name="RoutedPerExpertE">(token, expert) pairs the router chose per expert, before capacity (int64 [E]).</param>
/// <param name="KeptPerExpertE">
/// (token, expert) pairs each expert actually processes after capacity (int64 [E]): the per-expert token
/// counts to report. Equals <paramref name="RoutedPerExpertE"/> when dropless; unlike
/// <paramref name="RowsPerExpertE"/> it never counts padding rows.
/// </param>
public sealed record Dispatch(Tensor RowsRH, Tensor TokenOfRowR, Tensor WeightOfRowR, Tensor RowsPerExpertE, Tensor RoutedPerExpertE, Tensor KeptPerExpertE)
{
    /// <summary>Pairs dropped by capacity per expert: routed − kept (int64 [E]; zeros when dropless).</summary>
    public Tensor DroppedPerExpertE => RoutedPerExpertE - KeptPerExpertE;

    /// <summary>
    /// Fraction of the T·K routed pairs that capacity dropped, as an fp32 scalar tensor (0 when dropless):
    /// drop rate = Σ_e (routed_e − kept_e) / Σ_e routed_e. Stays on the device; read it once per step.
    /// </summary>
    public Tensor DropRate => DroppedPerExpertE.sum().to(ScalarType.Float32) / RoutedPerExpertE.sum().clamp_min(1).to(ScalarType.Float32);
}

/// <summary>
/// Local dispatch on one rank (Megatron's token_dispatcher "local prepare" and "local finish" phases;
/// the expert-parallel all-to-all will sit between them): capacity and token dropping, permutation into
/// expert-contiguous rows, and the weighted un-permutation.
/// </summary>
/// <remarks>
/// <para>
/// Capacity (GShard, Lepikhin et al. 2020, arXiv:2006.16668; Megatron <c>moe_utils.get_capacity</c>, rule R085):
/// <c>C = ceil(T·K / E · factor)</c> rows per expert, with T the tokens on this rank. A null factor is
/// dropless (every routed pair is computed). When an expert receives more than C pairs it keeps C of them:
/// </para>
/// <list type="bullet">
/// <item><c>probs</c>: the C pairs with the highest combine weight (ties: the earlier pair in Megatron's token
/// order, as below);</item>
/// <item><c>position</c>: the C earliest pairs in Megatron's token order. Megatron takes a top-k over the 0/1
/// routing column; on CUDA torch.topk fills ties in index order, so it keeps the earliest rows of its
/// flattened [S, B] input, i.e. sequence-major: token (b, s) comes at s·B + b, not at our batch-major b·S + s.
/// The two orders agree for one sequence per micro-batch.</item>
/// </list>
/// <para>
/// A dropped pair simply contributes nothing to its token's output (the residual connection carries the
/// token on); the other slot of a top-2 token still counts with its original weight — weights are not
/// renormalised after dropping, as in Megatron. Pad-to-capacity (<c>--moe-pad-expert-input-to-capacity</c>)
/// fills each expert to exactly min(C, T) rows with zero-weight rows of token 0: fixed shapes for the experts,
/// same result (Megatron's capacity mask selects every token for every expert when C &gt; T; its all-to-all
/// dispatcher cannot reshape that case, its all-gather one computes T rows per expert).
/// </para>
/// <para>
/// Rows are ordered by expert with a stable sort, so inside an expert they keep token order; the combine
/// is an index_add of w · y into the token's output row, in the hidden dtype.
/// </para>
/// </remarks>
public static class LocalTokenDispatcher
{
    /// <param name="hiddenTH">Tokens batch-major.</param>
    /// <param name="routing">The router's choices.</param>
    /// <param name="experts">E.</param>
    /// <param name="options">Capacity factor, drop policy, pad-to-capacity.</param>
    /// <param name="sequences">B: the T tokens are B sequences of T / B (for the position drop policy's order).</param>
    public static Dispatch Permute(Tensor hiddenTH, Routing routing, int experts, MoeOptions options, int sequences = 1)
    {
        long tokens = hiddenTH.shape[0];
        int k = options.TopK;
        var flatExperts = routing.ExpertsTK.flatten();                               // [T·K]
        var flatWeights = routing.WeightsTK.flatten();                               // [T·K]
        // Token of each pair, t = pair / K. (repeat_interleave would read its output size back from the device.)
        var flatTokens = torch.arange(tokens * k, device: hiddenTH.device).div(k, rounding_mode: RoundingMode.floor); // [T·K]
        var routed = CountPerExpert(flatExperts, experts);
        var keptPerExpert = routed;
        var rowsPerExpert = routed;

        if (options.CapacityFactor is double factor)
        {
            long capacity = Capacity(tokens, k, experts, factor);
            var keep = KeepMask(flatExperts, flatWeights, experts, capacity, options.DropPolicy,
                sequences > 1 ? SequenceMajorPosition(flatTokens, tokens, sequences) : null);
            var kept = keep.nonzero().squeeze(1);
            flatExperts = flatExperts.index_select(0, kept);
            flatWeights = flatWeights.index_select(0, kept);
            flatTokens = flatTokens.index_select(0, kept);
            keptPerExpert = CountPerExpert(flatExperts, experts);
            rowsPerExpert = keptPerExpert;
            if (options.PadToCapacity)
            {
                var missing = (Math.Min(capacity, tokens) - keptPerExpert).clamp_min(0);
                var padExperts = torch.repeat_interleave(torch.arange(experts, device: hiddenTH.device), missing);
                long pads = padExperts.shape[0];
                flatExperts = torch.cat(new[] { flatExperts, padExperts });
                flatWeights = torch.cat(new[] { flatWeights, torch.zeros(pads, dtype: flatWeights.dtype, device: hiddenTH.device) });
                flatTokens = torch.cat(new[] { flatTokens, torch.zeros(pads, dtype: ScalarType.Int64, device: hiddenTH.device) });
                rowsPerExpert = CountPerExpert(flatExperts, experts);
            }
        }

        var (_, order) = flatExperts.sort(stable: true);
        var tokenOfRow = flatTokens.index_select(0, order);
        return new Dispatch(
            hiddenTH.index_select(0, tokenOfRow),
            tokenOfRow,
            flatWeights.index_select(0, order),
            rowsPerExpert,
            routed,
            keptPerExpert);
    }

    /// <summary>
    /// out_t = Σ_rows of t  weight · y_row in the hidden dtype (weights cast to it first, as transformers 4
    /// does; in fp32 this is exact, in bf16 it avoids an fp32 copy of every expert output).
    /// </summary>
    public static Tensor Unpermute(Tensor outputsRH, Dispatch d, long tokens)
    {
        var weighted = outputsRH * d.WeightOfRowR.to(outputsRH.dtype).unsqueeze(1);
        return torch.zeros(tokens, outputsRH.shape[1], dtype: outputsRH.dtype, device: outputsRH.device)
            .index_add(0, d.TokenOfRowR, weighted, 1);
    }

    /// <summary>
    /// Occurrences of each expert id, int64 [E]. torch.bincount would do, but on CUDA it reads the largest id
    /// back to the host (a synchronisation that stalls the launch queue every layer); a scatter-add does not.
    /// </summary>
    public static Tensor CountPerExpert(Tensor expertIds, int experts) =>
        torch.zeros(experts, dtype: ScalarType.Int64, device: expertIds.device).scatter_add_(0, expertIds, torch.ones_like(expertIds));

    /// <summary>
    /// Where token t = b·S + s (batch-major, ours) stands in Megatron's sequence-major order: s·B + b.
    /// </summary>
    public static Tensor SequenceMajorPosition(Tensor tokenOfPair, long tokens, int sequences)
    {
        if (sequences < 1 || tokens % sequences != 0)
            throw new ArgumentException($"{tokens} tokens are not {sequences} sequences of equal length.", nameof(sequences));
        long seq = tokens / sequences;
        return tokenOfPair.remainder(seq) * sequences + tokenOfPair.div(seq, rounding_mode: RoundingMode.floor);
    }

    /// <summary>Megatron's capacity: ceil(T·K / E · factor).</summary>
    public static long Capacity(long tokens, int topK, int experts, double factor) =>
        (long)Math.Ceiling(tokens * (double)topK / experts * factor);

    /// <summary>Which of the T·K (token, expert) pairs an expert of capacity C keeps.</summary>
    /// <param name="flatExperts">Expert of each pair, [T·K], token-major.</param>
    /// <param name="flatWeights">Combine weight of each pair.</param>
    /// <param name="experts">E.</param>
    /// <param name="capacity">C.</param>
    /// <param name="policy">probs: highest weights first; position: earliest first.</param>
    /// <param name="positionOfPair">Each pair's place in Megatron's token order (<see cref="SequenceMajorPosition"/>): the order of position, and the tie order of probs; null = the pair order itself.</param>
    public static Tensor KeepMask(Tensor flatExperts, Tensor flatWeights, int experts, long capacity, DropPolicy policy, Tensor? positionOfPair = null)
    {
        // Rank each pair inside its expert: by descending weight (probs) or by position (position), then keep rank < C.
        Tensor order;
        if (policy == DropPolicy.Probs || positionOfPair is not null)
        {
            // Pairs in Megatron's token order first (when it differs from ours), so that stable sorts break
            // ties as torch.topk does on CUDA: the earlier row of Megatron's [S, B] input wins.
            var basis = positionOfPair?.sort(stable: true).Indices;
            Tensor byKey;
            if (policy == DropPolicy.Position) byKey = basis!;
            else if (basis is null) (_, byKey) = flatWeights.sort(descending: true, stable: true);
            else byKey = basis.index_select(0, flatWeights.index_select(0, basis).sort(descending: true, stable: true).Indices);
            var (_, byExpert) = flatExperts.index_select(0, byKey).sort(stable: true);
            order = byKey.index_select(0, byExpert);
        }
        else
        {
            (_, order) = flatExperts.sort(stable: true);
        }
        var sortedExperts = flatExperts.index_select(0, order);
        var counts = CountPerExpert(sortedExperts, experts);
        var starts = counts.cumsum(0) - counts;
        var rankInExpert = torch.arange(order.shape[0], device: order.device) - starts.index_select(0, sortedExperts);
        var keepSorted = rankInExpert.lt(capacity);
        return torch.zeros_like(keepSorted).index_put_(keepSorted, order);
    }
}
