using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shape legend
//   T  tokens of one micro-batch on this rank (B·S, batch-major)    E  experts
//   K  router top-k                                                 L  MoE layers
//   B  sequences in the micro-batch, S tokens per sequence
//
// Every loss here is returned *before* its coefficient; the caller multiplies by the recipe's
// AuxLossCoeff / ZLossCoeff (or config.json's router_aux_loss_coef for transformers parity).

/// <summary>
/// Load-balancing and z losses, in transformers' and Megatron-Core's formulas.
/// </summary>
/// <remarks>
/// <para>
/// All load-balancing losses are variants of the Switch Transformer loss (Fedus, Zoph, Shazeer 2021,
/// "Switch Transformers", arXiv:2101.03961, eq. 4–6): with f_e the fraction of routed (token, expert)
/// pairs that went to expert e and P_e the mean router probability of e,
/// <c>aux = α · E · Σ_e f_e · P_e</c>, minimised by a uniform router. They differ in which tokens the
/// fractions are taken over and how f is normalised:
/// </para>
/// <list type="table">
/// <item><term><see cref="Transformers"/></term><description>all layers' tokens at once, f not divided by K (transformers 5.17, HF parity);</description></item>
/// <item><term><see cref="Switch"/></term><description>Megatron <c>aux_loss</c>: one micro-batch, per layer;</description></item>
/// <item><term><see cref="Sequence(Tensor, Tensor, int, int)"/></term><description>Megatron <c>seq_aux_loss</c>: per sequence, averaged over the micro-batch (DeepSeek-V2/V3's sequence-wise balance loss);</description></item>
/// <item><term><see cref="Global"/></term><description>Megatron <c>global_aux_loss</c>: counts accumulated over the micro-batches of a global batch (Qiu et al. 2025, "Demons in the Detail", arXiv:2501.11873).</description></item>
/// </list>
/// <para>
/// Megatron computes the balance losses from a fresh top-k over the scores (<c>compute_routing_scores_for_aux_loss</c>),
/// i.e. with the counts <b>before</b> capacity drops, and only in training with gradients enabled. The scores
/// are the softmax over all E experts, or for sigmoid routing the sigmoid scores normalised to sum to one
/// per token (see <see cref="TopKRouter"/>).
/// </para>
/// </remarks>
public static class AuxLosses
{
    /// <summary>
    /// transformers 5.17 <c>load_balancing_loss_func</c> over all layers at once. With P = softmax(z) of every
    /// layer's logits concatenated ([L·T, E]) and c_e the top-k selections of expert e in any slot:
    /// <c>aux = E · Σ_e (c_e / (L·T)) · mean_t P_te</c>. Not divided by K, so a uniform router gives K
    /// (2.0 for Mixtral); the mixtral-tiny fixture's 2.0631752 is reproduced by exactly this form.
    /// </summary>
    /// <param name="logitsPerLayerTE">Raw router logits of each layer, [T, E] each.</param>
    /// <param name="experts">E.</param>
    /// <param name="topK">K.</param>
    /// <param name="tokenMaskT">
    /// transformers' attention mask flattened batch-major ([T], 1 = token, 0 = padding), or null. With a mask
    /// both means become sums over the unpadded rows of every layer divided by their count, so padding
    /// neither counts as routed nor dilutes P̄.
    /// </param>
    public static Tensor Transformers(IReadOnlyList<Tensor> logitsPerLayerTE, int experts, int topK, Tensor? tokenMaskT = null)
    {
        var probsNE = torch.cat(logitsPerLayerTE.Select(l => l.to(ScalarType.Float32)).ToArray()).softmax(-1);   // N = L·T
        var (_, selectedNK) = probsNE.topk(topK, dim: -1);
        var maskNKE = nn.functional.one_hot(selectedNK, experts).to(ScalarType.Float32);
        if (tokenMaskT is null)
        {
            var tokensPerExpertKE = maskNKE.mean([0]);      // f[k, e]: fraction of rows whose slot k chose e
            var probPerExpertE = probsNE.mean([0]);         // P̄[e]
            return (tokensPerExpertKE * probPerExpertE.unsqueeze(0)).sum() * experts;
        }
        var keepN1 = tokenMaskT.to(ScalarType.Float32).repeat(logitsPerLayerTE.Count).unsqueeze(1);   // the same mask for every layer
        var kept = keepN1.sum();
        var maskedKE = (maskNKE * keepN1.unsqueeze(2)).sum([0]) / kept;
        var maskedE = (probsNE * keepN1).sum([0]) / kept;
        return (maskedKE * maskedE.unsqueeze(0)).sum() * experts;
    }

    /// <summary>
    /// Megatron <c>switch_load_balancing_loss_func</c> for one layer and one micro-batch:
    /// <c>aux = E / (K · T²) · Σ_e (Σ_t p_te) · c_e</c>, with p the aux scores over all experts and c_e the
    /// (token, expert) pairs routed to e in any of the K slots, before capacity. Equivalently
    /// E · Σ_e (c_e / (K·T)) · (Σ_t p_te / T): f is normalised by K, so a uniform router gives 1.
    /// The gradient flows through p only (the counts are integers).
    /// </summary>
    /// <param name="scoresTE">Aux scores (fp32), each row summing to one.</param>
    /// <param name="routedPerExpertE">c_e (integer or, for <see cref="Global"/>, averaged float counts).</param>
    /// <param name="topK">K.</param>
    /// <param name="totalTokens">
    /// T, the tokens the counts were taken over: this rank's by default; with the counts summed over a
    /// sequence-partition group (tensor × context parallel), this rank's times the group's size, and the result is
    /// this rank's share of the whole loss (Megatron <c>get_tokens_per_expert_and_token_count</c>).
    /// </param>
    public static Tensor Switch(Tensor scoresTE, Tensor routedPerExpertE, int topK, long? totalTokens = null)
    {
        long tokens = totalTokens ?? scoresTE.shape[0];
        int experts = (int)scoresTE.shape[1];
        var probSumE = scoresTE.sum([0]);
        return (probSumE * routedPerExpertE.to(ScalarType.Float32)).sum() * (experts / ((double)topK * tokens * tokens));
    }

    /// <summary>
    /// Megatron <c>seq_aux_loss</c>: the switch loss of each sequence on its own, averaged over the B sequences:
    /// <c>aux = (1/B) · Σ_b E / (K · S²) · Σ_e (Σ_{t∈b} p_te) · c_be</c>, c_be the pairs of sequence b routed to e.
    /// Penalises imbalance inside a sequence even when the batch as a whole is balanced.
    /// </summary>
    /// <param name="scoresTE">Aux scores, tokens batch-major (sequence b owns rows b·S … b·S+S−1).</param>
    /// <param name="expertsTK">Top-k expert ids of each token (before capacity).</param>
    /// <param name="batch">B.</param>
    /// <param name="topK">K.</param>
    public static Tensor Sequence(Tensor scoresTE, Tensor expertsTK, int batch, int topK) =>
        Sequence(scoresTE, CountsPerSequence(expertsTK, batch, (int)scoresTE.shape[1]), batch, topK, scoresTE.shape[0] / batch);

    /// <summary>
    /// <see cref="Sequence(Tensor, Tensor, int, int)"/> from given counts: with the counts of every sequence summed
    /// over a sequence-partition group (tensor × context parallel, each rank holding part of every sequence) and
    /// <paramref name="sequenceLength"/> the whole sequence, this rank's share of the whole loss (Megatron
    /// <c>_apply_seq_aux_loss</c>: counts over tp_cp, total tokens = local · group size).
    /// </summary>
    /// <param name="scoresTE">Aux scores of this rank's tokens, batch-major.</param>
    /// <param name="countsBE">(token, expert) pairs of each sequence routed to each expert.</param>
    /// <param name="batch">B.</param>
    /// <param name="topK">K.</param>
    /// <param name="sequenceLength">S, the tokens of one sequence the counts cover.</param>
    public static Tensor Sequence(Tensor scoresTE, Tensor countsBE, int batch, int topK, long sequenceLength)
    {
        long local = scoresTE.shape[0] / batch;
        int experts = (int)scoresTE.shape[1];
        var probSumBE = scoresTE.view(batch, local, experts).sum([1]);
        return (probSumBE * countsBE.to(ScalarType.Float32)).sum([1]).mean() * (experts / ((double)topK * sequenceLength * sequenceLength));
    }

    /// <summary>(token, expert) pairs of each of the B sequences (batch-major tokens) routed to each expert, int64 [B, E].</summary>
    public static Tensor CountsPerSequence(Tensor expertsTK, int batch, int experts) =>
        nn.functional.one_hot(expertsTK, experts).sum([1]).view(batch, expertsTK.shape[0] / batch, experts).sum([1]);

    /// <summary>
    /// Megatron <c>global_aux_loss</c>: the switch loss of this micro-batch's scores against the routed counts
    /// <b>averaged over the micro-batches seen so far in the global batch</b>:
    /// <c>aux = E / (K · T²) · Σ_e (Σ_t p_te) · (Σ_{m≤i} c_e^(m) / i)</c> at micro-batch i. With data parallelism
    /// Megatron also sums the counts over the TP×DP×CP group and multiplies T by its size
    /// (<paramref name="totalTokens"/>; <see cref="MoeLayer.MegatronAuxLoss"/> does both); one process has group size 1.
    /// The running sum lives in <see cref="GlobalAuxLossTracker"/>.
    /// </summary>
    public static Tensor Global(Tensor scoresTE, Tensor averagedRoutedPerExpertE, int topK, long? totalTokens = null) =>
        Switch(scoresTE, averagedRoutedPerExpertE, topK, totalTokens);

    /// <summary>
    /// Router z-loss (Zoph et al. 2022, "ST-MoE", arXiv:2202.08906, eq. 5; Megatron <c>z_loss_func</c>):
    /// <c>z = (1/T) · Σ_t (log Σ_e exp z_te)²</c>, before its coefficient. Keeps router logits small so the
    /// fp32 softmax stays well conditioned. Megatron divides the coefficient by the TP×CP size per rank.
    /// Computed in the logits' dtype as Megatron does for fp32 and fp64 (<c>--moe-router-dtype</c>); bf16
    /// logits (no router dtype) are raised to fp32 here, where Megatron would sum in bf16.
    /// </summary>
    public static Tensor ZLoss(Tensor logitsTE) =>
        (logitsTE.dtype == ScalarType.Float64 ? logitsTE : logitsTE.to(ScalarType.Float32)).logsumexp(-1).square().mean();
}

/// <summary>
/// The running per-expert routed counts of one layer over a global batch, for <see cref="AuxLosses.Global"/>
/// (Megatron's router buffers <c>global_tokens_per_expert</c> and <c>ga_steps</c>). The trainer calls
/// <see cref="Reset"/> after every optimizer step, as Megatron resets its tracker once per iteration.
/// </summary>
public sealed class GlobalAuxLossTracker : IDisposable
{
    private readonly Tensor sumE;

    public GlobalAuxLossTracker(int experts, Device device)
    {
        sumE = torch.zeros(experts, dtype: ScalarType.Float32, device: device).DetachFromDisposeScope();
    }

    /// <summary>Micro-batches accumulated since the last reset.</summary>
    public int Steps { get; private set; }

    /// <summary>Adds this micro-batch's counts and returns the average over the micro-batches so far (fp32 [E]).</summary>
    public Tensor Accumulate(Tensor routedPerExpertE)
    {
        using (torch.no_grad()) sumE.add_(routedPerExpertE.to(ScalarType.Float32).to(sumE.device));
        Steps++;
        return (sumE / Steps).to(routedPerExpertE.device);   // the model may have moved since the tracker was made
    }

    /// <summary>Starts a new global batch.</summary>
    public void Reset()
    {
        using (torch.no_grad()) sumE.zero_();
        Steps = 0;
    }

    public void Dispose() => sumE.Dispose();
}
