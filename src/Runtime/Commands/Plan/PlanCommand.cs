using System.Globalization;
using System.Text;
using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Dsl.Planning;

namespace Moe.Runtime.Commands.Plan;

/// <summary>Validates a recipe and writes its plan.</summary>
public static class PlanCommand
{
    /// <summary>
    /// Prints the plan of <paramref name="settings"/> on its <see cref="Parallelism.Gpu"/>. Errors throw a
    /// <see cref="UserError"/>; warnings (MOE0301 when the estimate exceeds the GPU's memory) are printed first.
    /// </summary>
    public static int Execute(RecipeSettings settings, TextWriter output)
    {
        RecipeFindings.ThrowIfInvalid(settings, warnings: output);
        output.Write(Render(settings));
        return 0;
    }

    /// <summary>The plan as text (the recipe must be valid).</summary>
    public static string Render(RecipeSettings s)
    {
        var gpu = GpuSpec.Of(s.Parallelism.Gpu);
        var m = s.Model;
        var p = s.Parallelism;
        var sb = new StringBuilder();
        string I(long v) => v.ToString("N0", CultureInfo.InvariantCulture);
        void Line(string label, string value) => sb.Append("  ").Append(label.PadRight(26)).Append(value).Append('\n');

        // The moe tool plans a preset, whose name is the model's; a recipe project plans its class.
        string subject = s.Name == m.Name ? m.Name : $"{s.Name}: {m.Name}";
        sb.Append($"Plan for {subject}, {I(m.ParameterCount)} parameters ({I(m.ActiveParameterCount)} active per token)\n\n");

        sb.Append("Layout\n");
        Line("GPUs", $"{I(p.Gpus)} × {gpu.Name} ({gpu.MemoryGB.ToString(CultureInfo.InvariantCulture)} GB)");
        Line("tensor / pipeline", $"{p.Tensor} / {p.Pipeline}" + (p.VirtualPipeline is int v ? $" (virtual {v})" : ""));
        Line("context", I(p.Context));
        Line("expert / expert tensor", $"{p.Expert} / {p.EffectiveExpertTensor}" + (p.ExpertTensor is null ? " (= tensor)" : ""));
        Line("sequence parallel", p.SequenceParallel ? "on" : "off");
        Line("rank order", RankLayout.OrderName(p.Order));
        Line("data parallel", $"{p.DataParallel} = {p.Gpus} / ({p.Tensor}·{p.Pipeline}·{p.Context})");
        Line("expert data parallel", $"{p.ExpertDataParallel} = {p.Gpus} / ({p.EffectiveExpertTensor}·{p.Expert}·{p.Pipeline})");
        Line("gradient accumulation", $"{s.GradientAccumulationSteps} = {s.Training.GlobalBatchSize} / ({s.Training.MicroBatchSize}·{p.DataParallel})");

        sb.Append("\nProcess groups (size × count)\n");
        void Group(string name, int size) => Line(name, size > 0 ? $"{size} × {p.Gpus / size}" : "-");
        Group("tp", p.Tensor);
        Group("cp", p.Context);
        Group("dp", p.DataParallel);
        Group("dp-cp", p.DataParallel * p.Context);
        Group("pp", p.Pipeline);
        Group("tp-pp (model parallel)", p.Tensor * p.Pipeline);
        Group("ep", p.Expert);
        Group("expert tp", p.EffectiveExpertTensor);
        Group("expert dp", p.ExpertDataParallel);
        Group("expert tp-ep", p.EffectiveExpertTensor * p.Expert);

        sb.Append("\nPipeline stages → layers" + (p.VirtualPipeline is int vpp ? $" ({vpp} virtual chunks per stage)" : "") + "\n");
        for (int stage = 0; stage < p.Pipeline; stage++)
        {
            var ranges = PipelineSplit.LayersOfStage(stage, m.Layers, p.Pipeline, p.VirtualPipeline, p.FirstStageLayers, p.LastStageLayers);
            Line($"stage {stage}", string.Join(", ", ranges) + $" ({ranges.Sum(r => r.Count)})");
        }

        sb.Append("\nExpert-parallel rank → experts (every MoE layer)\n");
        for (int r = 0; r < p.Expert; r++)
        {
            var experts = ExpertSplit.ExpertsOfRank(r, m.Experts, p.Expert);
            Line($"ep rank {r}", experts.Count == 1 ? $"expert {experts.Start}" : $"experts {experts.Start}–{experts.End - 1}");
        }

        sb.Append("\nRouter and capacity\n");
        Line("top-k / score", $"{s.TopK} of {m.Experts} / {s.Router.ScoreFunction}" + (s.Router.PreSoftmax ? " (pre-softmax)" : "") +
            (s.Router.GroupTopK is int gk ? $", within {gk} of {s.Router.NumGroups} expert groups" : "") +
            (s.Router.Dtype is RouterDtype d ? $", router in {d.ToString().ToLowerInvariant()}" : ""));
        if (s.Router.EnableExpertBias)
            Line("expert bias", $"aux-loss-free, rate {RecipeOptions.Invariant(s.Router.BiasUpdateRate)} per step");
        Line("load balancing", $"{s.Router.LoadBalancing}, coefficient {RecipeOptions.Invariant(s.AuxLossCoeff)}" +
            (s.Router.ZLossCoeff is double z ? $", z-loss {RecipeOptions.Invariant(z)}" : ""));
        Line("capacity", s.Capacity.Factor is double f
            ? $"factor {RecipeOptions.Invariant(f)}, drop by {s.Capacity.DropPolicy}" + (s.Capacity.PadToCapacity ? ", padded" : "")
            : "dropless");
        Line("dispatcher", s.Dispatcher.ToString());
        if (s.Capacity.Factor is null)
            Line("routing skew (plan)", $"most loaded expert at {RecipeOptions.Invariant(s.Capacity.RoutingSkew)} × its fair share (Capacity.RoutingSkew)");
        Line("recompute", RecomputeOptions.Describe(s.Recompute));

        var h = s.Health;
        string Share(double? v) => v is double d ? d.ToString("P0", CultureInfo.InvariantCulture) : "off";
        sb.Append("\nEvaluation and health\n");
        Line("validation", s.Training.EvalInterval is int every ? $"every {every} steps and at the end, {s.Training.EvalIters} × {s.Training.GlobalBatchSize} samples" : "off");
        Line("loss must fall over", h.LossWindow is int lw ? $"{lw} steps" : "off");
        Line("drop rate at most", Share(h.MaxDropRate) + $" (mean of {h.Window} steps)");
        Line("expert load at most", h.MaxLoadImbalance is double imb ? $"{RecipeOptions.Invariant(imb)} × the layer's mean" : "off");
        Line("top-k share at most", Share(h.CollapseShare) + " (router collapse)");
        Line("free memory at least", Share(h.MinMemoryHeadroom));
        Line("all-to-all at most", Share(h.MaxAllToAllShare) + " of the step");
        Line("stops on", h.StopOn == HealthSignal.None ? "nothing (warnings only)" : h.StopOn.ToString());

        var mem = MemoryEstimate.For(s);
        string G(double bytes) => (bytes / 1e9).ToString("0.0", CultureInfo.InvariantCulture) + " GB";
        sb.Append($"\nMemory per GPU (estimate, most loaded rank, distributed optimizer, {s.Training.Precision})\n");
        Line("parameters", I(mem.ParametersPerGpu));
        Line("weights", G(mem.WeightsBytes));
        Line("gradients", G(mem.GradientsBytes));
        Line("optimizer state", G(mem.OptimizerBytes));
        Line("activations", G(mem.ActivationsBytes) + $" (micro-batch {s.Training.MicroBatchSize} × {s.Data.SequenceLength} tokens, {mem.RoutingAssumption})");
        Line("  at uniform routing", G(mem.ActivationsUniformBytes));
        Line("  expert rows per layer", $"{I((long)Math.Round(mem.RoutedRows))} (uniform: {I((long)Math.Round(mem.RoutedRowsUniform))})");
        Line("backward working set", G(mem.BackwardBytes) + " (one layer: ∂gate/up of its rows, the gate/up weight gradient)");
        Line("CUDA, NCCL, allocator", G(mem.OverheadBytes));
        Line("total", $"{G(mem.TotalBytes)} of {gpu.Name}'s {gpu.MemoryGB.ToString(CultureInfo.InvariantCulture)} GB: " +
            (mem.FitsOn(gpu) ? "fits" : $"WILL NOT FIT ({Moe.Dsl.Validation.DiagnosticIds.PlanDoesNotFitGpu})"));
        string others = string.Join(", ", GpuSpec.All.Where(g => g != gpu).Select(g => $"{g.Name} {(mem.FitsOn(g) ? "fits" : "no")}"));
        Line("other GPUs", others);
        return sb.ToString();
    }
}
