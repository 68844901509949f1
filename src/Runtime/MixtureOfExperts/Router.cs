using Moe.Dsl;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shape legend
//   T  tokens (B·S, batch-major)   H  hidden size   E  experts   K  router top-k
//   z  router logits [T, E]        p  scores [T, E]  w  combine weights [T, K]

/// <summary>What the router decided for a batch of tokens.</summary>
/// <param name="LogitsTE">Raw router logits z = W_gate·h in the model dtype (what transformers returns as router_logits).</param>
/// <param name="ScoresTE">Per-expert scores over all experts in fp32, each row summing to one (softmax, or sigmoid normalised), used by the aux losses.</param>
/// <param name="WeightsTK">Combine weights of the K chosen experts (fp32).</param>
/// <param name="ExpertsTK">Chosen expert ids (int64), in descending score order.</param>
public sealed record Routing(Tensor LogitsTE, Tensor ScoresTE, Tensor WeightsTK, Tensor ExpertsTK);

/// <summary>
/// Top-k token-choice router (Shazeer et al. 2017, arXiv:1701.06538; Megatron
/// <c>moe_utils.topk_routing_with_score_function</c>; transformers <c>MixtralTopKRouter</c>).
/// With logits z_t = W_gate · h_t (in the model dtype) and scores computed in fp32:
/// <list type="bullet">
/// <item>softmax, post-softmax (the default; Mixtral): p_t = softmax(z_t) over all E, take the top-k, and
/// renormalise, w_tk = p_tk / Σ_j p_tj. This equals Megatron's softmax over the k selected logits, because
/// the softmax's normaliser cancels.</item>
/// <item>softmax, pre-softmax (<c>--moe-router-pre-softmax</c>): p_t = softmax(z_t), top-k, w = p without
/// renormalisation (the k weights sum to less than 1).</item>
/// <item>sigmoid (<c>--moe-router-score-function sigmoid</c>; DeepSeek-V3, arXiv:2412.19437): s_t = σ(z_t)
/// per expert, top-k of s, renormalised over the k when K &gt; 1.</item>
/// </list>
/// Megatron rule R066 (shared/spec/megatron-rules.md). Top-k ties follow torch.topk (lower index first on
/// CPU); the aux losses use their own scores (<see cref="Routing.ScoresTE"/>).
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
