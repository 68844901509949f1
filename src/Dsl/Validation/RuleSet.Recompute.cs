using System.Collections.Generic;
using System.Linq;
using static Moe.Dsl.Validation.Arithmetic;

namespace Moe.Dsl.Validation;

public static partial class RuleSet
{
    private static IEnumerable<Rule> RecomputeRules()
    {
        // MOE0302 (R122): Megatron raises ValueError in TransformerConfig.__post_init__ when full recompute has no
        // method or no recompute_num_layers; its message asks for 1 ≤ n ≤ layers per pipeline rank. Each stage (each
        // model chunk under a virtual pipeline) then applies the method to its own layers, clipping n to them
        // (TransformerBlock._checkpointed_forward), so with uneven stages the bound is the largest stage.
        var full = D(DiagnosticIds.RecomputeFullIncomplete, "Full recompute needs a method and a number of layers within a stage", RuleCategory.Memory, "R122",
            "Recompute.Granularity", "Recompute.Method", "Recompute.NumLayers", "Parallelism.Pipeline", "Parallelism.FirstStageLayers", "Parallelism.LastStageLayers", "Model.Layers");
        yield return new Rule(full, (s, _) =>
        {
            var r = s.Recompute;
            if (r.Granularity != RecomputeGranularity.Full) return None;
            var stages = StageLayerCounts(s.Parallelism, s.Model.Layers);
            int perStage = stages is null ? s.Model.Layers : stages.Max();
            if (r.Method is null)
                return One(full, "Granularity = Full needs a Method: Uniform (chunks of NumLayers layers, each recomputed as a unit) or Block " +
                    "(the first NumLayers layers of each stage, or of each model chunk under a virtual pipeline); Megatron: --recompute-method uniform|block",
                    new SuggestedFix("Set Method = RecomputeMethod.Uniform", "Recompute.Method", "Moe.Dsl.RecomputeMethod.Uniform"), "Recompute.Method", "Recompute.Granularity");
            if (r.NumLayers is not int n)
                return One(full, $"Granularity = Full needs NumLayers between 1 and the {F(perStage)} layers of a pipeline stage; Megatron: --recompute-num-layers",
                    SetFix("Recompute.NumLayers", 1), "Recompute.NumLayers", "Recompute.Granularity");
            if (n < 1 || n > perStage)
                return One(full, $"NumLayers ({F(n)}) must be between 1 and the {F(perStage)} layers of " + (stages is not null && stages.Distinct().Count() > 1
                        ? $"the largest pipeline stage (stages of {string.Join(", ", stages.Select(c => F(c)))} layers)"
                        : $"a pipeline stage ({F(s.Model.Layers)} layers / Pipeline {F(s.Parallelism.Pipeline)})"),
                    SetFix("Recompute.NumLayers", n < 1 ? 1 : perStage), "Recompute.NumLayers");
            return None;
        });

        // MOE0303 (R122): selective recompute with recompute_num_layers is a ValueError in Megatron, with a method a
        // CLI assertion; with no recompute at all Megatron ignores them, which hides a typo, so Moe refuses that too.
        var methodWithoutFull = D(DiagnosticIds.RecomputeMethodWithoutFull, "Method and NumLayers apply only to full recompute", RuleCategory.Memory, "R122",
            "Recompute.Granularity", "Recompute.Method", "Recompute.NumLayers");
        yield return new Rule(methodWithoutFull, (s, _) =>
        {
            var r = s.Recompute;
            if (r.Granularity == RecomputeGranularity.Full || (r.Method is null && r.NumLayers is null)) return None;
            string what = r.Method is not null && r.NumLayers is not null ? "Method and NumLayers" : r.Method is not null ? "Method" : "NumLayers";
            string path = r.Method is not null ? "Recompute.Method" : "Recompute.NumLayers";
            string granularity = r.Granularity == RecomputeGranularity.Selective ? "selective recompute (every layer, the modules in Modules)" : "no recompute";
            return One(methodWithoutFull, $"{what} choose the layers of full recompute, but Granularity = {r.Granularity} means {granularity}; " +
                "remove them, or set Granularity = RecomputeGranularity.Full",
                new SuggestedFix($"Remove {Leaf(path)}", path, null), path, "Recompute.Granularity");
        });

        // MOE0304 (R123): Megatron accepts "mlp" and "layernorm" in the module list. Mixtral has no dense MLP, so
        // "mlp" would recompute nothing; "layernorm" needs output-discarding checkpointing, which Moe lacks.
        var modules = D(DiagnosticIds.RecomputeModuleUnsupported, "Selective recompute modules must exist in Mixtral and in Moe", RuleCategory.Memory, "R123",
            "Recompute.Granularity", "Recompute.Modules");
        yield return new Rule(modules, (s, _) =>
        {
            var r = s.Recompute;
            if (r.Granularity != RecomputeGranularity.Selective) return None;
            var bad = new List<string>();
            if ((r.Modules & RecomputeModules.Mlp) != 0) bad.Add("Mlp (Mixtral has no dense MLP: every layer is MoE; recompute the MoE layer with Moe)");
            if ((r.Modules & RecomputeModules.Layernorm) != 0) bad.Add("Layernorm (Moe does not discard a norm's output after its consumer ran, as Megatron's CheckpointWithoutOutput does)");
            var known = RecomputeModules.CoreAttn | RecomputeModules.MoeAct | RecomputeModules.Layernorm | RecomputeModules.Mlp | RecomputeModules.Moe;
            if ((r.Modules & ~known) != 0) bad.Add($"value {(int)(r.Modules & ~known)} (not a module)");
            if (bad.Count == 0) return None;
            var keep = r.Modules & (RecomputeModules.CoreAttn | RecomputeModules.MoeAct | RecomputeModules.Moe);
            return One(modules, $"Modules cannot include {string.Join("; ", bad)}. Valid: CoreAttn, MoeAct, Moe",
                new SuggestedFix("Keep the supported modules", "Recompute.Modules", Flags(keep)), "Recompute.Modules");
        });

        // MOE0305 (Moe): the plan's dropless routing skew. A top-k router gives an expert at most every token, E/k
        // times its fair share T·k/E; below 1 no expert can be the most loaded.
        var skew = D(DiagnosticIds.RoutingSkewOutOfRange, "RoutingSkew must be between 1 and Experts / TopK", RuleCategory.Memory, "Moe",
            "Capacity.RoutingSkew", "Router.TopK", "Model.ExpertsPerToken", "Model.Experts", "Model.Name");
        yield return new Rule(skew, (s, _) =>
        {
            double k = s.TopK, e = s.Model.Experts, x = s.Capacity.RoutingSkew;
            if (k < 1 || e < k) return None;
            double most = e / k;
            if (x >= 1 && x <= most) return None;
            return One(skew, $"RoutingSkew ({F(x)}) must be between 1 (every expert at its fair share T·k/E) and E/k = {F(e)}/{F(k)} = {F(most)} " +
                $"(one expert takes every token of {s.Model.Name})",
                new SuggestedFix($"Set RoutingSkew = {F(x < 1 || double.IsNaN(x) ? 1 : most)}", "Capacity.RoutingSkew", F(x < 1 || double.IsNaN(x) ? 1 : most)), "Capacity.RoutingSkew");
        });
    }

    private static string Flags(RecomputeModules m) => m == RecomputeModules.None
        ? "Moe.Dsl.RecomputeModules.None"
        : string.Join(" | ", new[] { RecomputeModules.CoreAttn, RecomputeModules.MoeAct, RecomputeModules.Moe }.Where(f => (m & f) != 0).Select(f => "Moe.Dsl.RecomputeModules." + f));
}
