using System;
using System.Collections.Generic;
using System.Linq;
using System.Threading;
using Microsoft.CodeAnalysis;
using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Dsl.Validation;
using Moe.Generators.Evaluation;

namespace Moe.Generators;

public sealed partial class RecipeGenerator
{
    /// <summary>Evaluates a recipe once and turns it into a <see cref="RecipeSpec"/> of plain values.</summary>
    internal static class Parser
    {
        /// <summary>Family key (as in the Megatron vectors) → emitted property name and Megatron's group name.</summary>
        private static readonly (string Key, string Property, string Megatron)[] Families =
        [
            ("tp", "Tensor", "TENSOR_MODEL_PARALLEL_GROUP"),
            ("cp", "Context", "CONTEXT_PARALLEL_GROUP"),
            ("dp", "Data", "DATA_PARALLEL_GROUP"),
            ("dp_cp", "DataWithContext", "DATA_PARALLEL_GROUP_WITH_CP"),
            ("pp", "Pipeline", "PIPELINE_MODEL_PARALLEL_GROUP"),
            ("mp", "Model", "MODEL_PARALLEL_GROUP"),
            ("tp_pp", "TensorAndPipeline", "MODEL_PARALLEL_GROUP (tp-pp alias)"),
            ("tp_cp", "TensorAndContext", "TENSOR_AND_CONTEXT_PARALLEL_GROUP"),
            ("tp_dp", "TensorAndData", "TENSOR_AND_DATA_PARALLEL_GROUP"),
            ("tp_dp_cp", "TensorAndDataWithContext", "TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP"),
            ("embedding", "Embedding", "EMBEDDING_GROUP"),
            ("position_embedding", "PositionEmbedding", "POSITION_EMBEDDING_GROUP"),
            ("ep", "Expert", "EXPERT_MODEL_PARALLEL_GROUP"),
            ("expert_tp", "ExpertTensor", "EXPERT_TENSOR_PARALLEL_GROUP"),
            ("expert_dp", "ExpertData", "EXPERT_DATA_PARALLEL_GROUP"),
            ("tp_ep", "ExpertTensorAndModel", "EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP"),
            ("tp_ep_pp", "ExpertTensorModelPipeline", "EXPERT_TENSOR_MODEL_PIPELINE_PARALLEL_GROUP"),
            ("intra_dist_opt", "IntraDistributedOptimizerInstance", "INTRA_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP"),
            ("gtp_remat", "WeightRemat", "GTP_WEIGHT_REMAT_GROUP"),
            ("expert_gtp_remat", "ExpertWeightRemat", "EXPERT_GTP_WEIGHT_REMAT_GROUP"),
        ];

        /// <summary>What the layout is computed from; if any is unknown at compile time the fallback is emitted.</summary>
        private static readonly string[] LayoutInputs = ["Parallelism", "Model.Layers", "Model.Experts"];

        public static RecipeSpec Parse(GeneratorAttributeSyntaxContext context, CancellationToken cancellationToken)
        {
            var recipe = (INamedTypeSymbol)context.TargetSymbol;
            // The analyzers' evaluator: the same values they check; its locations stay here, not in the spec.
            RecipeSettings settings = RecipeEvaluator.Evaluate(recipe, context.SemanticModel.Compilation, cancellationToken).Settings;
            cancellationToken.ThrowIfCancellationRequested();

            var errors = Moe.Dsl.Validation.RuleSet.Validate(settings)
                .Where(f => f.Rule.DefaultSeverity == RuleSeverity.Error)
                .Select(f => $"{f.Rule.Id} [{f.PrimaryPath}]: {f.Message}")
                .OrderBy(f => f, StringComparer.Ordinal)
                .ToEquatableArray();
            var unknown = settings.Unknown.OrderBy(u => u, StringComparer.Ordinal).ToEquatableArray();
            bool layoutKnown = !LayoutInputs.Any(settings.IsUnknown);
            LayoutSpec? layout = null;
            if (errors.Count == 0 && layoutKnown)
            {
                try
                {
                    layout = Layout(settings);
                }
                catch (ArgumentException e)
                {
                    // A split the rule set let through (it should not): emit the fallback, which defers to start-up, with the reason.
                    errors = new[] { "layout: " + e.Message }.ToEquatableArray();
                }
            }

            return new RecipeSpec(
                Namespace: recipe.ContainingNamespace.IsGlobalNamespace ? null : recipe.ContainingNamespace.ToDisplayString(),
                ClassName: recipe.Name,
                FullyQualifiedName: recipe.ToDisplayString(SymbolDisplayFormat.FullyQualifiedFormat),
                IsPublic: recipe.DeclaredAccessibility == Accessibility.Public,
                ModelName: settings.Model.Name,
                Layout: layout,
                Findings: errors,
                Unknown: unknown);
        }

        private static LayoutSpec Layout(RecipeSettings settings)
        {
            var p = settings.Parallelism;
            var layout = new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);
            int layers = settings.Model.Layers;
            int experts = settings.Model.Experts;

            var ranks = Enumerable.Range(0, layout.World).Select(r =>
            {
                var c = layout.Coordinates(r);
                return new RankSpec(r, c.Tp, c.Cp, c.Dp, c.Pp, c.DpCp, c.Ep, c.Etp, c.Edp);
            });
            var families = Families.Select(f => new GroupFamilySpec(
                f.Key, f.Property, f.Megatron,
                layout.Groups[f.Key].Select(g => g.ToEquatableArray()).ToEquatableArray()));
            var creation = layout.CreationOrder.Select(c => new GroupCreationSpec(c.Description, c.Backend, c.GroupsKey, c.FirstIndex, c.Count));
            var stages = new List<StageLayersSpec>();
            for (int stage = 0; stage < p.Pipeline; stage++)
            {
                var chunks = PipelineSplit.LayersOfStage(stage, layers, p.Pipeline, p.VirtualPipeline, p.FirstStageLayers, p.LastStageLayers);
                for (int chunk = 0; chunk < chunks.Count; chunk++)
                    stages.Add(new StageLayersSpec(stage, chunk, chunks[chunk].Start, chunks[chunk].Count));
            }
            var expertRanks = Enumerable.Range(0, p.Expert).Select(r =>
            {
                var owned = ExpertSplit.ExpertsOfRank(r, experts, p.Expert);
                return new ExpertRankSpec(r, owned.Start, owned.Count);
            });

            return new LayoutSpec(
                layout.World, layout.Tensor, layout.Pipeline, layout.Context, layout.Expert, layout.ExpertTensor,
                layout.DataParallel, layout.ExpertDataParallel, layout.OrderString, p.SequenceParallel, p.VirtualPipeline ?? 1,
                layers, experts,
                ranks.ToEquatableArray(), families.ToEquatableArray(), creation.ToEquatableArray(),
                stages.ToEquatableArray(), expertRanks.ToEquatableArray());
        }
    }
}
