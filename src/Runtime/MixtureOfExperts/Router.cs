using Moe.Dsl;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shapes: T tokens (B·S, batch-major), H hidden, E experts, K = top-k.

/// <summary>What the router decided for a batch of tokens.</summary>
/// <param name="LogitsTE">Raw router logits z = W_gate·h in the model dtype (what transformers returns as router_logits).</param>
/// <param name="ScoresTE">Per-expert scores over all experts in fp32 (softmax or sigmoid of the logits), used by the aux losses.</param>
/// <param name="WeightsTK">Combine weights of the K chosen experts (fp32).</param>
/// <param name="ExpertsTK">Chosen expert ids (int64).</param>
public sealed record Routing(Tensor LogitsTE, Tensor ScoresTE, Tensor WeightsTK, Tensor ExpertsTK);

/// <summary>
/// Top-k router (Megatron moe_utils.topk_routing_with_score_function; transformers MixtralTopKRouter):
/// <list type="bullet">
/// <item>softmax, post: p = softmax(z) over all E in fp32, take the top-k, renormalise so the k weights sum to 1
/// (equal to Megatron's softmax over the k selected logits);</item>
/// <item>softmax, pre-softmax: p = softmax(z), top-k, no renormalisation;</item>
/// <item>sigmoid: s = σ(z), top-k, renormalised when k &gt; 1.</item>
/// </list>
/// </summary>
public static class TopKRouter
{
    public static Routing Route(Tensor hiddenTH, Tensor gateWeightEH, MoeOptions options)
    {
        var logitsTE = nn.functional.linear(hiddenTH, gateWeightEH);
        var logitsF = logitsTE.to(ScalarType.Float32);
        Tensor scoresTE = options.ScoreFunction == ScoreFunction.Sigmoid ? logitsF.sigmoid() : logitsF.softmax(-1);
        var (topTK, expertsTK) = scoresTE.topk(options.TopK, dim: -1);
        bool renormalise = options.ScoreFunction == ScoreFunction.Sigmoid ? options.TopK > 1 : !options.PreSoftmax;
        var weightsTK = renormalise ? topTK / topTK.sum(-1, keepdim: true) : topTK;
        // Aux losses use scores over all experts that sum to one per token (Megatron
        // compute_routing_scores_for_aux_loss): the softmax, or the sigmoid scores normalised.
        var auxScoresTE = options.ScoreFunction == ScoreFunction.Sigmoid ? scoresTE / (scoresTE.sum(-1, keepdim: true) + 1e-20) : scoresTE;
        return new Routing(logitsTE, auxScoresTE, weightsTK, expertsTK);
    }
}
