using System.Linq;
using System.Threading;
using Microsoft.CodeAnalysis;
using Moe.Dsl.Layout;
using Moe.Dsl.Validation;
using RuleSet = Moe.Dsl.Validation.RuleSet;
using Moe.Generators.Evaluation;
using Moe.Generators.Specs;

namespace Moe.Generators;

public sealed partial class RecipeGenerator
{
    /// <summary>Symbol → <see cref="RecipeSpec"/>: the only step that sees symbols and the compilation.</summary>
    public static class Parser
    {
        public static RecipeSpec Parse(INamedTypeSymbol recipe, Compilation compilation, CancellationToken ct)
        {
            var evaluation = RecipeEvaluator.Evaluate(recipe, compilation, ct);
            var s = evaluation.Settings;
            var spec = new RecipeSpec
            {
                Namespace = recipe.ContainingNamespace.IsGlobalNamespace ? "" : recipe.ContainingNamespace.ToDisplayString(),
                ClassName = recipe.Name,
                ModelName = s.Model.Name,
            };
            var problems = evaluation.Unknown.Select(u => $"{u.Path} is not a compile-time constant ({u.Reason})")
                .Concat(RuleSet.Validate(s).Where(f => f.Rule.DefaultSeverity == RuleSeverity.Error).Select(f => $"{f.Rule.Id}: {f.Message}"))
                .ToArray();
            bool layoutUnknown = s.Unknown.Any(u => u == "Model" || u.StartsWith("Model.", System.StringComparison.Ordinal)
                || u == "Parallelism" || u.StartsWith("Parallelism.", System.StringComparison.Ordinal));
            if (problems.Length > 0 || layoutUnknown)
                return spec with { Problems = new EquatableArray<string>(problems) };

            var p = s.Parallelism;
            var layout = new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);
            return spec with
            {
                LayoutKnown = true,
                Problems = new EquatableArray<string>(System.Array.Empty<string>()),
                Gpus = p.Gpus,
                Tensor = p.Tensor,
                Pipeline = p.Pipeline,
                Context = p.Context,
                Expert = p.Expert,
                ExpertTensor = p.EffectiveExpertTensor,
                DataParallel = layout.DataParallel,
                ExpertDataParallel = layout.ExpertDataParallel,
                VirtualPipeline = p.VirtualPipeline ?? 1,
                Order = layout.OrderString,
                Layers = s.Model.Layers,
                Experts = s.Model.Experts,
                WiringTableLimit = TableLimit(recipe),
                StageLayers = new EquatableArray<EquatableArray<RangeSpec>>(Enumerable.Range(0, p.Pipeline).Select(stage =>
                    new EquatableArray<RangeSpec>(PipelineSplit.LayersOfStage(stage, s.Model.Layers, p.Pipeline, p.VirtualPipeline, p.FirstStageLayers, p.LastStageLayers)
                        .Select(r => new RangeSpec(r.Start, r.Count))))),
                ExpertsOfRank = new EquatableArray<RangeSpec>(Enumerable.Range(0, p.Expert).Select(r =>
                {
                    var e = ExpertSplit.ExpertsOfRank(r, s.Model.Experts, p.Expert);
                    return new RangeSpec(e.Start, e.Count);
                })),
            };
        }

        /// <summary>[Recipe(WiringTableLimit = n)], else the default.</summary>
        private static int TableLimit(INamedTypeSymbol recipe)
        {
            var attribute = recipe.GetAttributes().FirstOrDefault(a => a.AttributeClass?.ToDisplayString() == "Moe.Dsl.RecipeAttribute");
            if (attribute is null) return Moe.Dsl.RecipeAttribute.DefaultWiringTableLimit;
            foreach (var argument in attribute.NamedArguments)
                if (argument.Key == nameof(Moe.Dsl.RecipeAttribute.WiringTableLimit) && argument.Value.Value is int limit) return limit;
            return Moe.Dsl.RecipeAttribute.DefaultWiringTableLimit;
        }
    }
}
