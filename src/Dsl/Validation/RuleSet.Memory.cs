using System.Collections.Generic;
using System.Globalization;
using System.Linq;
using Moe.Dsl.Planning;
using static Moe.Dsl.Validation.Arithmetic;

namespace Moe.Dsl.Validation;

public static partial class RuleSet
{
    private static IEnumerable<Rule> MemoryRules()
    {
        // MOE0301 (Moe's own): the plan's per-GPU estimate must fit the GPU the recipe names. Megatron has no
        // such check; the job finds out with an out-of-memory error after loading the checkpoint. A warning by
        // default (the estimate is an estimate); `dotnet_diagnostic.MOE0301.severity = error` makes it fail the build.
        var fits = W(DiagnosticIds.PlanDoesNotFitGpu, "The plan must fit in the GPU's memory", RuleCategory.Memory, "Moe",
            "Parallelism", "Model", "Router.TopK", "Training.MicroBatchSize", "Training.GlobalBatchSize", "Training.Precision", "Data.SequenceLength",
            "Capacity.Factor", "Capacity.PadToCapacity", "Capacity.RoutingSkew", "Recompute");
        yield return new Rule(fits, (s, _) =>
        {
            if (!MemoryEstimate.CanEstimate(s)) return None;
            var gpu = GpuSpec.Of(s.Parallelism.Gpu);
            var mem = MemoryEstimate.For(s);
            if (mem.FitsOn(gpu)) return None;
            string G(double bytes) => (bytes / 1e9).ToString("0.0", CultureInfo.InvariantCulture);
            var p = s.Parallelism;
            var larger = GpuSpec.All.Where(g => g.MemoryGB > gpu.MemoryGB && mem.FitsOn(g)).OrderBy(g => g.MemoryGB).ToArray();
            string other = larger.Length > 0
                ? $"It fits on {string.Join(", ", larger.Select(g => g.Name))} (Gpu = Gpu.{larger[0].Member}); "
                : "No GPU the planner knows holds it; ";
            return One(fits,
                $"The plan needs about {G(mem.TotalBytes)} GB per GPU on the most loaded rank (weights {G(mem.WeightsBytes)}, " +
                $"gradients {G(mem.GradientsBytes)}, optimizer state {G(mem.OptimizerBytes)}, activations {G(mem.ActivationsBytes)}, backward working set {G(mem.BackwardBytes)}, " +
                $"CUDA/NCCL/allocator {G(mem.OverheadBytes)} GB), more than the {gpu.Name}'s {F(gpu.MemoryGB)} GB. {other}" +
                $"to hold less per GPU use more Gpus (the distributed optimizer shards optimizer state over data parallel {F(p.DataParallel)} " +
                $"and expert data parallel {F(p.ExpertDataParallel)}), a larger Expert × ExpertTensor × Pipeline, activation recompute (Recompute = Recompute.FullEveryLayer), or a smaller MicroBatchSize or SequenceLength",
                null, "Parallelism.Gpu");
        });
    }
}
