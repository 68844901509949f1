using Moe.Dsl;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shapes: T tokens, H hidden, E experts, K top-k, R = rows sent to experts (T·K when dropless).

/// <summary>Token rows grouped by expert, and how to put the experts' outputs back.</summary>
/// <param name="RowsRH">Hidden states of the routed (token, expert) pairs, sorted by expert (stable: token order inside an expert).</param>
/// <param name="TokenOfRowR">The token each row came from.</param>
/// <param name="WeightOfRowR">The combine weight of each row (0 for padding rows).</param>
/// <param name="RowsPerExpertE">Rows per expert (int64, on the device).</param>
/// <param name="RoutedPerExpertE">(token, expert) pairs the router chose per expert, before capacity.</param>
public sealed record Dispatch(Tensor RowsRH, Tensor TokenOfRowR, Tensor WeightOfRowR, Tensor RowsPerExpertE, Tensor RoutedPerExpertE);

/// <summary>
/// Local dispatch on one rank (Megatron's token_dispatcher "local prepare" and "local finish" phases;
/// the expert-parallel all-to-all will sit between them): capacity and token dropping, permutation into
/// expert-contiguous rows, and the weighted un-permutation.
/// </summary>
/// <remarks>
/// Capacity (Megatron moe_utils.get_capacity): C = ceil(T·K / E · factor) rows per expert. Over-full experts
/// keep, with drop policy <c>probs</c>, their C highest-weight tokens; with <c>position</c>, their C earliest
/// tokens in the batch (Megatron takes a top-k over a 0/1 column, whose tie order is torch's; earliest is the
/// deterministic choice). Pad-to-capacity fills each expert to exactly C rows with zero-weight rows of token 0,
/// which changes the compute, not the result.
/// </remarks>
public static class LocalTokenDispatcher
{
    public static Dispatch Permute(Tensor hiddenTH, Routing routing, int experts, MoeOptions options)
    {
        long tokens = hiddenTH.shape[0];
        int k = options.TopK;
        var flatExperts = routing.ExpertsTK.flatten();                               // [T·K]
        var flatWeights = routing.WeightsTK.flatten();                               // [T·K]
        var flatTokens = torch.arange(tokens, device: hiddenTH.device).repeat_interleave(k); // [T·K]
        var routed = torch.bincount(flatExperts, minlength: experts);

        if (options.CapacityFactor is double factor)
        {
            long capacity = Capacity(tokens, k, experts, factor);
            var keep = KeepMask(flatExperts, flatWeights, experts, capacity, options.DropPolicy);
            var kept = keep.nonzero().squeeze(1);
            flatExperts = flatExperts.index_select(0, kept);
            flatWeights = flatWeights.index_select(0, kept);
            flatTokens = flatTokens.index_select(0, kept);
            if (options.PadToCapacity)
            {
                var perExpert = torch.bincount(flatExperts, minlength: experts);
                var missing = (capacity - perExpert).clamp_min(0);
                var padExperts = torch.repeat_interleave(torch.arange(experts, device: hiddenTH.device), missing);
                long pads = padExperts.shape[0];
                flatExperts = torch.cat(new[] { flatExperts, padExperts });
                flatWeights = torch.cat(new[] { flatWeights, torch.zeros(pads, dtype: flatWeights.dtype, device: hiddenTH.device) });
                flatTokens = torch.cat(new[] { flatTokens, torch.zeros(pads, dtype: ScalarType.Int64, device: hiddenTH.device) });
            }
        }

        var (_, order) = flatExperts.sort(stable: true);
        var tokenOfRow = flatTokens.index_select(0, order);
        return new Dispatch(
            hiddenTH.index_select(0, tokenOfRow),
            tokenOfRow,
            flatWeights.index_select(0, order),
            torch.bincount(flatExperts, minlength: experts),
            routed);
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

    /// <summary>Megatron's capacity: ceil(T·K / E · factor).</summary>
    public static long Capacity(long tokens, int topK, int experts, double factor) =>
        (long)Math.Ceiling(tokens * (double)topK / experts * factor);

    /// <summary>Which of the T·K (token, expert) pairs an expert of capacity C keeps.</summary>
    public static Tensor KeepMask(Tensor flatExperts, Tensor flatWeights, int experts, long capacity, DropPolicy policy)
    {
        // Rank each pair inside its expert: by descending weight (probs) or by position (position), then keep rank < C.
        Tensor order;
        if (policy == DropPolicy.Probs)
        {
            var (_, byWeight) = flatWeights.sort(descending: true, stable: true);
            var (_, byExpert) = flatExperts.index_select(0, byWeight).sort(stable: true);
            order = byWeight.index_select(0, byExpert);
        }
        else
        {
            (_, order) = flatExperts.sort(stable: true);
        }
        var sortedExperts = flatExperts.index_select(0, order);
        var counts = torch.bincount(sortedExperts, minlength: experts);
        var starts = counts.cumsum(0) - counts;
        var rankInExpert = torch.arange(order.shape[0], device: order.device) - starts.index_select(0, sortedExperts);
        var keepSorted = rankInExpert.lt(capacity);
        return torch.zeros_like(keepSorted).index_put_(keepSorted, order);
    }
}
