using Moe.Dsl;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shapes: T tokens (B·S, batch-major), E experts, K top-k, L layers.

/// <summary>Load-balancing and z losses, in transformers' and Megatron-Core's formulas.</summary>
public static class AuxLosses
{
    /// <summary>
    /// transformers 5.17 load_balancing_loss_func over all layers at once: with P = softmax(z) of every
    /// layer's logits concatenated ([L·T, E]) and c_e the top-k selections of expert e,
    /// aux = E · Σ_e (c_e / (L·T)) · mean_t P_te. Not divided by k: a uniform router gives k.
    /// </summary>
    public static Tensor Transformers(IReadOnlyList<Tensor> logitsPerLayerTE, int experts, int topK)
    {
        var probs = torch.cat(logitsPerLayerTE.Select(l => l.to(ScalarType.Float32)).ToArray()).softmax(-1);
        var (_, selected) = probs.topk(topK, dim: -1);
        var mask = nn.functional.one_hot(selected, experts).to(ScalarType.Float32);   // [L·T, K, E]
        var tokensPerExpert = mask.mean([0]);                                          // [K, E]
        var probPerExpert = probs.mean([0]);                                           // [E]
        return (tokensPerExpert * probPerExpert.unsqueeze(0)).sum() * experts;
    }

    /// <summary>
    /// Megatron switch_load_balancing_loss_func for one layer: aux = E / (K·T²) · Σ_e (Σ_t p_te) · c_e,
    /// with p the softmax scores over all experts and c_e the tokens routed to e (all K slots, before capacity).
    /// A uniform router gives 1.
    /// </summary>
    public static Tensor Switch(Tensor scoresTE, Tensor routedPerExpertE, int topK)
    {
        long tokens = scoresTE.shape[0];
        int experts = (int)scoresTE.shape[1];
        var probSum = scoresTE.sum([0]);
        return (probSum * routedPerExpertE.to(ScalarType.Float32)).sum() * (experts / ((double)topK * tokens * tokens));
    }

    /// <summary>
    /// Megatron sequence_load_balancing_loss_func: the switch loss per sequence, averaged over the batch:
    /// aux = mean_b E / (K·S²) · Σ_e (Σ_{t∈b} p_te) · c_be.
    /// </summary>
    public static Tensor Sequence(Tensor scoresTE, Tensor expertsTK, int batch, int topK)
    {
        long tokens = scoresTE.shape[0];
        int experts = (int)scoresTE.shape[1];
        long seq = tokens / batch;
        var countsBE = nn.functional.one_hot(expertsTK, experts).sum([1]).to(ScalarType.Float32).view(batch, seq, experts).sum([1]);
        var probSumBE = scoresTE.view(batch, seq, experts).sum([1]);
        return (probSumBE * countsBE).sum([1]).mean() * (experts / ((double)topK * seq * seq));
    }

    /// <summary>Megatron z_loss_func: mean over tokens of logsumexp(z)², before its coefficient.</summary>
    public static Tensor ZLoss(Tensor logitsTE) =>
        logitsTE.to(ScalarType.Float32).logsumexp(-1).square().mean();
}
