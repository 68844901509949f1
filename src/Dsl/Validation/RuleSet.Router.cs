using System.Collections.Generic;
using System.Linq;
using static Moe.Dsl.Validation.Arithmetic;

namespace Moe.Dsl.Validation;

public static partial class RuleSet
{
    private const RuleCategory RouterCat = RuleCategory.RouterAndCapacity;

    private static IEnumerable<Rule> RouterRules()
    {
        // MOE0101 (R061): Megatron lets torch.topk fail at the first forward.
        var topK = D(DiagnosticIds.TopKOutOfRange, "TopK must be between 1 and the number of experts", RouterCat, "R061",
            "Router.TopK", "Model.ExpertsPerToken", "Model.Experts", "Model.Name");
        yield return new Rule(topK, (s, _) =>
        {
            int k = s.TopK, e = s.Model.Experts;
            if (e < 1 || (k >= 1 && k <= e)) return None;
            return One(topK, $"TopK ({F(k)}) must be between 1 and the {F(e)} experts of {s.Model.Name}",
                SetFix("Router.TopK", k < 1 ? 1 : e), "Router.TopK");
        });

        // MOE0102 (R062): softmax over a single selected logit is constant.
        var topOne = D(DiagnosticIds.TopKOneNeedsPreSoftmax, "TopK = 1 with softmax routing needs PreSoftmax", RouterCat, "R062",
            "Router.TopK", "Router.ScoreFunction", "Router.PreSoftmax", "Model.ExpertsPerToken");
        yield return new Rule(topOne, (s, _) => s.TopK == 1 && s.Router.ScoreFunction == ScoreFunction.Softmax && !s.Router.PreSoftmax
            ? One(topOne, "TopK = 1 with softmax scoring after top-k gives every token a weight of exactly 1, so the router gets no gradient; set PreSoftmax = true (softmax over all experts, then top-1)",
                new SuggestedFix("Set PreSoftmax = true", "Router.PreSoftmax", "true"), "Router.PreSoftmax", "Router.TopK")
            : None);

        // MOE0103 (Moe): Megatron ignores the pre-softmax flag for sigmoid scores.
        var preSigmoid = W(DiagnosticIds.PreSoftmaxIgnoredWithSigmoid, "PreSoftmax has no effect with sigmoid scores", RouterCat, "R066",
            "Router.PreSoftmax", "Router.ScoreFunction");
        yield return new Rule(preSigmoid, (s, _) => s.Router.PreSoftmax && s.Router.ScoreFunction == ScoreFunction.Sigmoid
            ? One(preSigmoid, "PreSoftmax = true is ignored with ScoreFunction = Sigmoid (sigmoid scores are taken per expert, then renormalised over the top-k); remove PreSoftmax",
                new SuggestedFix("Remove PreSoftmax", "Router.PreSoftmax", null), "Router.PreSoftmax")
            : None);

        // MOE0104 (R067).
        var groups = D(DiagnosticIds.GroupLimitedRoutingIncomplete, "Group-limited routing needs NumGroups dividing the experts and GroupTopK ≤ NumGroups", RouterCat, "R067",
            "Router.NumGroups", "Router.GroupTopK", "Model.Experts", "Model.Name");
        yield return new Rule(groups, (s, _) =>
        {
            var r = s.Router;
            int e = s.Model.Experts;
            if (r.GroupTopK is not int gk) return None;
            if (r.NumGroups is not int g)
                return One(groups, $"GroupTopK ({F(gk)}) needs NumGroups: group-limited routing picks GroupTopK of NumGroups expert groups; valid NumGroups: {Join(Divisors(e))}", null, "Router.NumGroups", "Router.GroupTopK");
            if (g < 1 || e % g != 0)
                return One(groups, $"NumGroups ({F(g)}) must divide the {F(e)} experts of {s.Model.Name}; valid: {Join(Divisors(e))}",
                    e >= 1 ? SetFix("Router.NumGroups", Nearest(Divisors(e), g)) : null, "Router.NumGroups");
            if (gk < 1 || gk > g)
                return One(groups, $"GroupTopK ({F(gk)}) must be between 1 and NumGroups ({F(g)})", SetFix("Router.GroupTopK", gk < 1 ? 1 : g), "Router.GroupTopK");
            return None;
        });

        // MOE0105 (R070): Megatron does not check; the wrong arithmetic silently selects masked experts.
        var groupMath = D(DiagnosticIds.GroupLimitedRoutingArithmetic, "Group-limited routing must be able to select TopK experts", RouterCat, "R070",
            "Router.NumGroups", "Router.GroupTopK", "Router.TopK", "Model.ExpertsPerToken", "Model.Experts");
        yield return new Rule(groupMath, (s, _) =>
        {
            var r = s.Router;
            int e = s.Model.Experts, k = s.TopK;
            if (r.GroupTopK is not int gk || r.NumGroups is not int g || g < 1 || gk < 1 || gk > g || e % g != 0 || k < 1) return None;
            int perGroup = e / g;
            if (k < gk)
                return One(groupMath, $"TopK ({F(k)}) must be at least GroupTopK ({F(gk)}): each kept group is scored by its top TopK / GroupTopK = {F(k / gk)} experts", SetFix("Router.GroupTopK", k), "Router.GroupTopK");
            if (k / gk > perGroup)
                return One(groupMath, $"TopK / GroupTopK = {F(k)} / {F(gk)} = {F(k / gk)} exceeds the experts per group ({F(e)} / {F(g)} = {F(perGroup)}): each kept group is scored by that many of its experts", null, "Router.GroupTopK");
            if (k > gk * perGroup)
                return One(groupMath, $"TopK ({F(k)}) exceeds the experts in the kept groups: GroupTopK × experts per group = {F(gk)} × {F(perGroup)} = {F(gk * perGroup)}; masked experts would be chosen", null, "Router.GroupTopK");
            return None;
        });

        // MOE0106 (R071).
        var groupsIgnored = W(DiagnosticIds.NumGroupsWithoutGroupTopK, "NumGroups without GroupTopK is ignored", RouterCat, "R071",
            "Router.NumGroups", "Router.GroupTopK");
        yield return new Rule(groupsIgnored, (s, _) => s.Router.NumGroups is int g && s.Router.GroupTopK is null
            ? One(groupsIgnored, $"NumGroups ({F(g)}) is ignored without GroupTopK (plain top-k routing is used); set GroupTopK or remove NumGroups",
                new SuggestedFix("Remove NumGroups", "Router.NumGroups", null), "Router.NumGroups")
            : None);

        // MOE0107 (R074).
        var auxUnused = W(DiagnosticIds.AuxLossCoeffUnused, "AuxLossCoeff is unused with LoadBalancing = None", RouterCat, "R074",
            "Router.AuxLossCoeff", "Router.LoadBalancing");
        yield return new Rule(auxUnused, (s, _) => s.Router.LoadBalancing == LoadBalancing.None && s.Router.AuxLossCoeff is double c && c != 0
            ? One(auxUnused, $"AuxLossCoeff ({F(c)}) is never used because LoadBalancing = None; remove it or choose a load-balancing loss",
                new SuggestedFix("Remove AuxLossCoeff", "Router.AuxLossCoeff", null), "Router.AuxLossCoeff")
            : None);

        // MOE0108 (Moe).
        var negative = D(DiagnosticIds.NegativeLossCoefficient, "Loss coefficients must not be negative", RouterCat, "Moe",
            "Router.AuxLossCoeff", "Router.ZLossCoeff");
        yield return new Rule(negative, (s, _) => NegativeCoefficients(negative, s.Router));

        // MOE0109: Megatron silently turns a negative factor into "dropless" (R081); we refuse.
        var factor = D(DiagnosticIds.CapacityFactorNotPositive, "Capacity factor must be positive", RouterCat, "R081",
            "Capacity.Factor");
        yield return new Rule(factor, (s, _) => s.Capacity.Factor is double f && !(f > 0)
            ? One(factor, $"Capacity factor ({F(f)}) must be positive (e.g. 1.0 or 1.25); remove Factor for dropless routing",
                new SuggestedFix("Remove Factor (dropless)", "Capacity.Factor", null), "Capacity.Factor")
            : None);

        // MOE0110 (R083).
        var pad = D(DiagnosticIds.PadToCapacityWithoutFactor, "PadToCapacity needs a capacity factor", RouterCat, "R083",
            "Capacity.PadToCapacity", "Capacity.Factor");
        yield return new Rule(pad, (s, _) => s.Capacity.PadToCapacity && s.Capacity.Factor is null
            ? One(pad, "PadToCapacity = true needs a capacity Factor (dropless routing has no capacity to pad to); set Factor or remove PadToCapacity",
                new SuggestedFix("Remove PadToCapacity", "Capacity.PadToCapacity", null), "Capacity.PadToCapacity")
            : None);

        // MOE0111 (R079): Megatron raises in TransformerConfig.__post_init__.
        var biasSigmoid = D(DiagnosticIds.ExpertBiasNeedsSigmoid, "The expert bias needs sigmoid scores", RouterCat, "R079",
            "Router.EnableExpertBias", "Router.ScoreFunction");
        yield return new Rule(biasSigmoid, (s, _) => s.Router.EnableExpertBias && s.Router.ScoreFunction != ScoreFunction.Sigmoid
            ? One(biasSigmoid, $"EnableExpertBias = true needs ScoreFunction = Sigmoid (aux-loss-free balancing adds the bias to per-expert sigmoid scores; with {s.Router.ScoreFunction} Megatron refuses it); set ScoreFunction = Sigmoid or remove EnableExpertBias",
                new SuggestedFix("Set ScoreFunction = Sigmoid", "Router.ScoreFunction", "Moe.Dsl.ScoreFunction.Sigmoid"), "Router.EnableExpertBias", "Router.ScoreFunction")
            : None);

        // MOE0112 (Moe): Megatron does not check; a negative rate pushes tokens towards the busiest experts.
        var rate = D(DiagnosticIds.BiasUpdateRateNotPositive, "BiasUpdateRate must be positive", RouterCat, "Moe",
            "Router.BiasUpdateRate");
        yield return new Rule(rate, (s, _) => !(s.Router.BiasUpdateRate > 0) || double.IsInfinity(s.Router.BiasUpdateRate)
            ? One(rate, $"BiasUpdateRate ({F(s.Router.BiasUpdateRate)}) must be a positive number: each optimizer step moves the expert bias by it towards balance (DeepSeek-V3 uses 1e-3, Megatron's default)",
                new SuggestedFix("Set BiasUpdateRate = 0.001", "Router.BiasUpdateRate", "0.001"), "Router.BiasUpdateRate")
            : None);

        // MOE0113 (Moe): like R071/R074, a setting Megatron silently ignores.
        var rateUnused = W(DiagnosticIds.BiasUpdateRateUnused, "BiasUpdateRate is unused without EnableExpertBias", RouterCat, "Moe",
            "Router.BiasUpdateRate", "Router.EnableExpertBias");
        yield return new Rule(rateUnused, (s, _) => !s.Router.EnableExpertBias && s.Router.BiasUpdateRate > 0 && !double.IsInfinity(s.Router.BiasUpdateRate) && s.Router.BiasUpdateRate != DefaultBiasUpdateRate
            ? One(rateUnused, $"BiasUpdateRate ({F(s.Router.BiasUpdateRate)}) is never used because EnableExpertBias is false; set EnableExpertBias = true or remove BiasUpdateRate",
                new SuggestedFix("Remove BiasUpdateRate", "Router.BiasUpdateRate", null), "Router.BiasUpdateRate")
            : None);
    }

    private static readonly double DefaultBiasUpdateRate = new Router().BiasUpdateRate;

    private static IEnumerable<Finding> NegativeCoefficients(RuleDescriptor d, Router r)
    {
        if (r.AuxLossCoeff is double a && a < 0)
            yield return new Finding(d, $"AuxLossCoeff ({F(a)}) must not be negative: a negative load-balancing loss rewards imbalance", new[] { "Router.AuxLossCoeff" });
        if (r.ZLossCoeff is double z && z < 0)
            yield return new Finding(d, $"ZLossCoeff ({F(z)}) must not be negative: a negative z-loss rewards large router logits", new[] { "Router.ZLossCoeff" });
    }
}
