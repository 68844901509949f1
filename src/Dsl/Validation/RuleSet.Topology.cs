using System.Collections.Generic;
using System.Linq;
using static Moe.Dsl.Validation.Arithmetic;

namespace Moe.Dsl.Validation;

public static partial class RuleSet
{
    private const RuleCategory Topo = RuleCategory.Topology;

    private static IEnumerable<Rule> TopologyRules()
    {
        // MOE0001 (R023): every size is a count of ranks.
        var sizes = D(DiagnosticIds.SizeNotPositive, "Parallel size must be at least 1", Topo, "R023",
            "Parallelism.Gpus", "Parallelism.Tensor", "Parallelism.Pipeline", "Parallelism.Context",
            "Parallelism.Expert", "Parallelism.ExpertTensor", "Parallelism.VirtualPipeline");
        yield return new Rule(sizes, (s, _) => SizeFindings(sizes, s.Parallelism));

        // MOE0002 (R001): dense DP = Gpus / (TP·PP·CP) must be whole.
        var gpusDense = D(DiagnosticIds.GpusNotDivisibleByModelParallel, "Gpus must be a multiple of Tensor × Pipeline × Context", Topo, "R001, R002",
            "Parallelism.Gpus", "Parallelism.Tensor", "Parallelism.Pipeline", "Parallelism.Context", "Parallelism.Expert", "Parallelism.ExpertTensor");
        yield return new Rule(gpusDense, (s, _) =>
        {
            var p = s.Parallelism;
            if (!SizesPositive(p) || p.Gpus % p.ModelParallelProduct == 0) return None;
            int step = (int)Lcm(p.ModelParallelProduct, p.ExpertParallelProduct);
            return One(gpusDense,
                $"Gpus ({F(p.Gpus)}) must be a multiple of Tensor × Pipeline × Context = {F(p.Tensor)} × {F(p.Pipeline)} × {F(p.Context)} = {F(p.ModelParallelProduct)}, " +
                $"so that data parallel (Gpus / {F(p.ModelParallelProduct)}) is whole; valid Gpus near {F(p.Gpus)}: {Join(NeighbouringMultiples(p.Gpus, step))}",
                SetFix("Parallelism.Gpus", CeilMultiple(p.Gpus, step)), "Parallelism.Gpus");
        });

        // MOE0003 (R055): each EP rank owns E/EP whole experts.
        var expertDivides = D(DiagnosticIds.ExpertNotDividingExperts, "Expert must divide the number of experts", Topo, "R055, R056",
            "Parallelism.Expert", "Model.Experts", "Model.Name");
        yield return new Rule(expertDivides, (s, _) =>
        {
            int ep = s.Parallelism.Expert, e = s.Model.Experts;
            if (ep < 1 || e < 1 || e % ep == 0) return None;
            var valid = Divisors(e);
            return One(expertDivides,
                $"Expert ({F(ep)}) must divide the {F(e)} experts of {s.Model.Name}; valid: {Join(valid)}",
                SetFix("Parallelism.Expert", Nearest(valid, ep)), "Parallelism.Expert");
        });

        // MOE0004 (R003): expert DP = Gpus / (ETP·EP·PP) must be whole. Megatron checks this only when it builds groups.
        var gpusExpert = D(DiagnosticIds.GpusNotDivisibleByExpertParallel, "Gpus must be a multiple of ExpertTensor × Expert × Pipeline", Topo, "R003",
            "Parallelism.Gpus", "Parallelism.Tensor", "Parallelism.Pipeline", "Parallelism.Context", "Parallelism.Expert", "Parallelism.ExpertTensor");
        yield return new Rule(gpusExpert, (s, _) =>
        {
            var p = s.Parallelism;
            if (!SizesPositive(p) || p.Gpus % p.ExpertParallelProduct == 0) return None;
            int step = (int)Lcm(p.ModelParallelProduct, p.ExpertParallelProduct);
            string etp = p.ExpertTensor is null ? "; ExpertTensor defaults to Tensor" : "";
            return One(gpusExpert,
                $"Gpus ({F(p.Gpus)}) must be a multiple of ExpertTensor × Expert × Pipeline = {F(p.EffectiveExpertTensor)} × {F(p.Expert)} × {F(p.Pipeline)} = {F(p.ExpertParallelProduct)} " +
                $"so that expert data parallel is whole (Megatron finds this only after launch{etp}); valid Gpus near {F(p.Gpus)}: {Join(NeighbouringMultiples(p.Gpus, step))}",
                SetFix("Parallelism.Gpus", CeilMultiple(p.Gpus, step)), "Parallelism.Gpus", "Parallelism.Expert");
        });

        // MOE0005 (R005): without pp-last ordering, expert and dense pipelines coincide only if EDP == DP.
        var order = D(DiagnosticIds.ExpertDataParallelMismatch, "Order tp-cp-ep-pp-dp needs expert data parallel equal to data parallel", Topo, "R005, R006",
            "Parallelism.Order", "Parallelism.Gpus", "Parallelism.Tensor", "Parallelism.Pipeline", "Parallelism.Context", "Parallelism.Expert", "Parallelism.ExpertTensor");
        yield return new Rule(order, (s, _) =>
        {
            var p = s.Parallelism;
            if (p.Order != Layout.RankOrder.TpCpEpPpDp || p.Pipeline <= 1 || !SizesPositive(p)) return None;
            if (p.DataParallel == 0 || p.ExpertDataParallel == 0 || p.DataParallel == p.ExpertDataParallel) return None;
            return One(order,
                $"With Order = TpCpEpPpDp and Pipeline ({F(p.Pipeline)}) > 1, expert data parallel ({F(p.Gpus)} / ({F(p.EffectiveExpertTensor)}·{F(p.Expert)}·{F(p.Pipeline)}) = {F(p.ExpertDataParallel)}) " +
                $"must equal data parallel ({F(p.Gpus)} / ({F(p.Tensor)}·{F(p.Context)}·{F(p.Pipeline)}) = {F(p.DataParallel)}), i.e. ExpertTensor × Expert ({F(p.EffectiveExpertTensor * p.Expert)}) " +
                $"must equal Tensor × Context ({F(p.Tensor * p.Context)}); use Order = RankOrder.TpCpEpDpPp (Megatron's default)",
                new SuggestedFix("Use Order = RankOrder.TpCpEpDpPp", "Parallelism.Order", "Moe.Dsl.Layout.RankOrder.TpCpEpDpPp"), "Parallelism.Order");
        });

        // MOE0006 (R014).
        var heads = D(DiagnosticIds.TensorNotDividingHeads, "Tensor must divide the attention heads", Topo, "R014",
            "Parallelism.Tensor", "Model.AttentionHeads", "Model.Name");
        yield return new Rule(heads, (s, _) =>
        {
            int tp = s.Parallelism.Tensor, h = s.Model.AttentionHeads;
            if (tp < 1 || h < 1 || h % tp == 0) return None;
            var valid = Divisors(h);
            return One(heads, $"Tensor ({F(tp)}) must divide the {F(h)} attention heads of {s.Model.Name}; valid: {Join(valid)}",
                SetFix("Parallelism.Tensor", Nearest(valid, tp)), "Parallelism.Tensor");
        });

        // MOE0007 (R016, R017): KV groups are split over TP, or replicated when there are fewer than TP.
        var kv = D(DiagnosticIds.TensorIncompatibleWithKeyValueHeads, "Tensor and the key-value heads must divide one another", Topo, "R016, R017",
            "Parallelism.Tensor", "Model.KeyValueHeads", "Model.AttentionHeads", "Model.Name");
        yield return new Rule(kv, (s, _) =>
        {
            int tp = s.Parallelism.Tensor, g = s.Model.KeyValueHeads, h = s.Model.AttentionHeads;
            if (tp < 1 || g < 1 || h < 1) return None;
            if (g % tp == 0 || (tp % g == 0 && h % g == 0)) return None;
            var valid = Enumerable.Range(1, h).Where(t => h % t == 0 && (g % t == 0 || t % g == 0)).ToArray();
            return One(kv,
                $"Tensor ({F(tp)}) and the {F(g)} key-value heads of {s.Model.Name} must be multiples or divisors of one another " +
                $"(each tensor rank holds whole key-value groups, or one replicated group); valid Tensor: {Join(valid)}",
                valid.Length > 0 ? SetFix("Parallelism.Tensor", Nearest(valid, tp)) : null, "Parallelism.Tensor");
        });

        // MOE0008 (R020).
        var ffn = D(DiagnosticIds.ExpertTensorNotDividingFfn, "ExpertTensor must divide the expert FFN size", Topo, "R020",
            "Parallelism.ExpertTensor", "Parallelism.Tensor", "Model.IntermediateSize", "Model.Name");
        yield return new Rule(ffn, (s, _) =>
        {
            int etp = s.Parallelism.EffectiveExpertTensor, f = s.Model.IntermediateSize;
            if (etp < 1 || f < 1 || f % etp == 0) return None;
            var valid = Divisors(f).Where(d => d <= 64).ToArray();
            string path = s.Parallelism.ExpertTensor is null ? "Parallelism.Tensor" : "Parallelism.ExpertTensor";
            string name = s.Parallelism.ExpertTensor is null ? "ExpertTensor (= Tensor)" : "ExpertTensor";
            return One(ffn, $"{name} ({F(etp)}) must divide the expert FFN size {F(f)} of {s.Model.Name}; valid: {Join(valid)}",
                SetFix(path, Nearest(valid, etp)), path);
        });

        // MOE0009 (R025): the core config rejects it; Megatron's CLI silently turns it off.
        var spNoTp = D(DiagnosticIds.SequenceParallelWithoutTensor, "Sequence parallel needs Tensor > 1", Topo, "R025",
            "Parallelism.SequenceParallel", "Parallelism.Tensor");
        yield return new Rule(spNoTp, (s, _) => s.Parallelism.SequenceParallel && s.Parallelism.Tensor == 1
            ? One(spNoTp, "SequenceParallel = true needs Tensor > 1 (sequence parallel splits the sequence over the tensor-parallel group, and Tensor is 1); remove SequenceParallel or raise Tensor",
                new SuggestedFix("Remove SequenceParallel", "Parallelism.SequenceParallel", null), "Parallelism.SequenceParallel")
            : None);

        // MOE0010 (R026): Megatron raises only at the first training step.
        var tpNoSp = D(DiagnosticIds.TensorParallelMoeNeedsSequenceParallel, "MoE training with Tensor > 1 needs sequence parallel", Topo, "R026",
            "Parallelism.SequenceParallel", "Parallelism.Tensor");
        yield return new Rule(tpNoSp, (s, _) => !s.Parallelism.SequenceParallel && s.Parallelism.Tensor > 1
            ? One(tpNoSp, $"Tensor ({F(s.Parallelism.Tensor)}) > 1 in an MoE model needs SequenceParallel = true (Megatron's MoE layer raises at the first training step otherwise)",
                new SuggestedFix("Set SequenceParallel = true", "Parallelism.SequenceParallel", "true"), "Parallelism.SequenceParallel", "Parallelism.Tensor")
            : None);

        // MOE0011 (R036): even split without first/last overrides.
        var ppLayers = D(DiagnosticIds.PipelineNotDividingLayers, "Pipeline must divide the layers", Topo, "R036",
            "Parallelism.Pipeline", "Parallelism.FirstStageLayers", "Parallelism.LastStageLayers", "Model.Layers", "Model.Name");
        yield return new Rule(ppLayers, (s, _) =>
        {
            var p = s.Parallelism;
            int l = s.Model.Layers;
            if (p.Pipeline < 1 || l < 1 || p.FirstStageLayers is not null || p.LastStageLayers is not null || l % p.Pipeline == 0) return None;
            var valid = Divisors(l);
            return One(ppLayers, $"Pipeline ({F(p.Pipeline)}) must divide the {F(l)} layers of {s.Model.Name} (or set FirstStageLayers/LastStageLayers for an uneven split); valid: {Join(valid)}",
                SetFix("Parallelism.Pipeline", Nearest(valid, p.Pipeline)), "Parallelism.Pipeline");
        });

        // MOE0012 (R039).
        var vppNoPp = D(DiagnosticIds.VirtualPipelineWithoutPipeline, "VirtualPipeline needs Pipeline > 1", Topo, "R039",
            "Parallelism.VirtualPipeline", "Parallelism.Pipeline");
        yield return new Rule(vppNoPp, (s, _) => s.Parallelism.VirtualPipeline is int v && v > 1 && s.Parallelism.Pipeline == 1
            ? One(vppNoPp, $"VirtualPipeline ({F(v)}) interleaves stages of a pipeline, but Pipeline is 1; remove VirtualPipeline or raise Pipeline",
                new SuggestedFix("Remove VirtualPipeline", "Parallelism.VirtualPipeline", null), "Parallelism.VirtualPipeline")
            : None);

        // MOE0013 (R038, R040): each stage's layers split into VPP chunks.
        var vppLayers = D(DiagnosticIds.VirtualPipelineNotDividingStage, "VirtualPipeline must divide each stage's layers", Topo, "R038, R040, R041",
            "Parallelism.VirtualPipeline", "Parallelism.Pipeline", "Parallelism.FirstStageLayers", "Parallelism.LastStageLayers", "Model.Layers");
        yield return new Rule(vppLayers, (s, _) =>
        {
            var p = s.Parallelism;
            if (p.VirtualPipeline is not int v || v < 1 || p.Pipeline <= 1 || s.Model.Layers < 1) return None;
            var stages = StageLayerCounts(p, s.Model.Layers);
            if (stages is null) return None;
            var bad = stages.Distinct().Where(c => c % v != 0).ToArray();
            if (bad.Length == 0) return None;
            var valid = Divisors((int)stages.Aggregate(0L, (a, c) => Gcd(a, c))).Where(d => d > 1).ToArray();
            return One(vppLayers,
                $"VirtualPipeline ({F(v)}) must divide the layers of every pipeline stage ({Join(stages)}); " +
                (valid.Length > 0 ? $"valid: {Join(valid)}" : "no VirtualPipeline > 1 fits; remove it"),
                valid.Length > 0 ? SetFix("Parallelism.VirtualPipeline", Nearest(valid, v)) : new SuggestedFix("Remove VirtualPipeline", "Parallelism.VirtualPipeline", null),
                "Parallelism.VirtualPipeline");
        });

        // MOE0014 (R041): uneven first/last stages.
        var uneven = D(DiagnosticIds.UnevenPipelineInvalid, "Uneven pipeline stages must add up", Topo, "R041",
            "Parallelism.FirstStageLayers", "Parallelism.LastStageLayers", "Parallelism.Pipeline", "Model.Layers", "Model.Name");
        yield return new Rule(uneven, (s, _) => UnevenFindings(uneven, s));

        // MOE0015 (R018, R023, R057): the model itself.
        var model = D(DiagnosticIds.ModelDimensionsInvalid, "Model dimensions must be consistent", Topo, "R018, R023, R057",
            "Model");
        yield return new Rule(model, (s, _) => ModelFindings(model, s.Model));
    }

    private static bool SizesPositive(Parallelism p) =>
        p.Gpus >= 1 && p.Tensor >= 1 && p.Pipeline >= 1 && p.Context >= 1 && p.Expert >= 1 && p.EffectiveExpertTensor >= 1;

    private static IEnumerable<Finding> SizeFindings(RuleDescriptor d, Parallelism p)
    {
        var sizes = new (string Name, int? Value)[]
        {
            ("Gpus", p.Gpus), ("Tensor", p.Tensor), ("Pipeline", p.Pipeline), ("Context", p.Context),
            ("Expert", p.Expert), ("ExpertTensor", p.ExpertTensor), ("VirtualPipeline", p.VirtualPipeline),
        };
        foreach (var (name, value) in sizes)
        {
            if (value is not int v || v >= 1) continue;
            yield return new Finding(d, $"{name} ({F(v)}) must be at least 1: it counts ranks", new[] { "Parallelism." + name }, SetFix("Parallelism." + name, 1));
        }
    }

    /// <summary>Layers per pipeline stage, or null when the split is invalid (reported by other rules).</summary>
    public static int[]? StageLayerCounts(Parallelism p, int layers) =>
        Layout.PipelineSplit.LayerCounts(layers, p.Pipeline, p.FirstStageLayers, p.LastStageLayers);

    private static IEnumerable<Finding> UnevenFindings(RuleDescriptor d, RecipeSettings s)
    {
        var p = s.Parallelism;
        int l = s.Model.Layers, pp = p.Pipeline;
        if (p.FirstStageLayers is null && p.LastStageLayers is null) yield break;
        if (p.FirstStageLayers is int f0 && f0 < 1)
            yield return new Finding(d, $"FirstStageLayers ({F(f0)}) must be at least 1", new[] { "Parallelism.FirstStageLayers" });
        if (p.LastStageLayers is int l0 && l0 < 1)
            yield return new Finding(d, $"LastStageLayers ({F(l0)}) must be at least 1", new[] { "Parallelism.LastStageLayers" });
        if ((p.FirstStageLayers ?? 1) < 1 || (p.LastStageLayers ?? 1) < 1 || pp < 1 || l < 1) yield break;
        string primary = p.FirstStageLayers is not null ? "Parallelism.FirstStageLayers" : "Parallelism.LastStageLayers";
        int fixedStages = (p.FirstStageLayers is null ? 0 : 1) + (p.LastStageLayers is null ? 0 : 1);
        if (pp == 1 || fixedStages > pp)
        {
            yield return new Finding(d, $"FirstStageLayers/LastStageLayers need Pipeline > {F(fixedStages - 1)} (Pipeline is {F(pp)})", new[] { primary, "Parallelism.Pipeline" });
            yield break;
        }
        int given = (p.FirstStageLayers ?? 0) + (p.LastStageLayers ?? 0);
        int middleLayers = l - given, middleStages = pp - fixedStages;
        string sum = $"{F(l)} layers − {F(given)} on the first/last stage = {F(middleLayers)} layers for {F(middleStages)} middle stage(s)";
        if (middleLayers < 0 || (middleStages == 0) != (middleLayers == 0))
            yield return new Finding(d, $"The uneven pipeline split of {s.Model.Name} does not add up: {sum}; middle layers and middle stages must both be zero or both non-zero", new[] { primary });
        else if (middleStages > 0 && middleLayers % middleStages != 0)
            yield return new Finding(d, $"The uneven pipeline split of {s.Model.Name} does not divide: {sum}, and {F(middleStages)} does not divide {F(middleLayers)}", new[] { primary });
    }

    private static IEnumerable<Finding> ModelFindings(RuleDescriptor d, Model m)
    {
        var positive = new (string Name, int Value)[]
        {
            ("HiddenSize", m.HiddenSize), ("IntermediateSize", m.IntermediateSize), ("Layers", m.Layers), ("AttentionHeads", m.AttentionHeads),
            ("KeyValueHeads", m.KeyValueHeads), ("Experts", m.Experts), ("ExpertsPerToken", m.ExpertsPerToken), ("VocabSize", m.VocabSize),
            ("MaxPositionEmbeddings", m.MaxPositionEmbeddings),
        };
        bool ok = true;
        foreach (var (name, value) in positive)
        {
            if (value >= 1) continue;
            ok = false;
            yield return new Finding(d, $"Model.{name} ({F(value)}) of {m.Name} must be at least 1", new[] { "Model." + name });
        }
        if (!ok) yield break;
        if (m.HeadDim is null && m.HiddenSize % m.AttentionHeads != 0)
            yield return new Finding(d, $"HiddenSize ({F(m.HiddenSize)}) of {m.Name} must be a multiple of AttentionHeads ({F(m.AttentionHeads)}) when HeadDim is not given", new[] { "Model.HeadDim" });
        if (m.AttentionHeads % m.KeyValueHeads != 0)
            yield return new Finding(d, $"AttentionHeads ({F(m.AttentionHeads)}) of {m.Name} must be a multiple of KeyValueHeads ({F(m.KeyValueHeads)}): each key-value head serves a whole group of query heads", new[] { "Model.KeyValueHeads" });
        if (m.HeadDim is int hd && hd < 1)
            yield return new Finding(d, $"HeadDim ({F(hd)}) of {m.Name} must be at least 1", new[] { "Model.HeadDim" });
    }
}
