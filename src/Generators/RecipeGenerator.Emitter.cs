using System.Globalization;
using System.IO;
using System.Linq;
using Moe.Generators.Specs;
using Scriban;
using Scriban.Runtime;

namespace Moe.Generators;

public sealed partial class RecipeGenerator
{
    /// <summary>Renders the embedded Scriban templates from a spec; numbers invariant, order as Megatron's.</summary>
    internal static class Emitter
    {
        private static readonly Template WiringTemplate = Load("Wiring.sbn-cs");
        private static readonly Template FallbackTemplate = Load("Fallback.sbn-cs");
        private static readonly Template EntryPointTemplate = Load("EntryPoint.sbn-cs");

        public static string Wiring(RecipeSpec spec)
        {
            if (!spec.LayoutKnown)
                return Render(FallbackTemplate, new { Namespace = spec.Namespace, ClassName = spec.ClassName, Problems = spec.Problems.ToArray() });
            var model = new
            {
                spec.Namespace,
                spec.ClassName,
                spec.ModelName,
                Constants = new (string Name, int Value, string Doc)[]
                {
                    ("Gpus", spec.Gpus, "World size."),
                    ("Tensor", spec.Tensor, "Tensor-parallel size."),
                    ("Pipeline", spec.Pipeline, "Pipeline-parallel size."),
                    ("VirtualPipeline", spec.VirtualPipeline, "Virtual pipeline chunks per stage (1: none)."),
                    ("Context", spec.Context, "Context-parallel size."),
                    ("Expert", spec.Expert, "Expert-parallel size."),
                    ("ExpertTensor", spec.ExpertTensor, "Expert tensor-parallel size."),
                    ("DataParallel", spec.DataParallel, "Dense data parallel: Gpus / (Tensor·Pipeline·Context)."),
                    ("ExpertDataParallel", spec.ExpertDataParallel, "Expert data parallel: Gpus / (ExpertTensor·Expert·Pipeline)."),
                    ("Layers", spec.Layers, "Transformer layers."),
                    ("Experts", spec.Experts, "Experts per MoE layer."),
                }.Select(c => new { c.Name, Value = I(c.Value), c.Doc }).ToArray(),
                spec.Order,
                Families = spec.Groups.Select(f => new
                {
                    f.Key,
                    Name = Pascal(f.Key),
                    Groups = f.Groups.Select(g => "new[] { " + string.Join(", ", g.Select(I)) + " }").ToArray(),
                }).ToArray(),
                Coordinates = spec.Coordinates.Select((c, r) => $"new({I(c.Tp)}, {I(c.Cp)}, {I(c.Dp)}, {I(c.Pp)}, {I(c.DpCp)}, {I(c.Ep)}, {I(c.Etp)}, {I(c.Edp)}), // rank {I(r)}").ToArray(),
                Creation = spec.CreationOrder.Select(c => $"new(\"{c.Description}\", \"{c.Backend}\", \"{c.Family}\", {I(c.First)}, {I(c.Count)}),").ToArray(),
                Stages = spec.StageLayers.Select((ranges, stage) => "new LayerRange[] { " + string.Join(", ", ranges.Select(r => $"new({I(r.Start)}, {I(r.Count)})")) + $" }}, // stage {I(stage)}").ToArray(),
                Experts = spec.ExpertsOfRank.Select((r, rank) => $"new({I(r.Start)}, {I(r.Count)}), // ep rank {I(rank)}").ToArray(),
            };
            return Render(WiringTemplate, model);
        }

        public static string EntryPoint(RecipeSpec spec) =>
            Render(EntryPointTemplate, new { Type = spec.Namespace.Length == 0 ? "global::" + spec.ClassName : $"global::{spec.Namespace}.{spec.ClassName}" });

        private static string Render(Template template, object model)
        {
            var globals = new ScriptObject();
            globals.Import(model, renamer: m => m.Name);
            // No loop limit: 128 GPUs give more than Scriban's default 1000 iterations (coordinates, creation runs).
            var context = new TemplateContext { MemberRenamer = m => m.Name, LoopLimit = 0 };
            context.PushGlobal(globals);
            return template.Render(context);
        }

        private static string I(int v) => v.ToString(CultureInfo.InvariantCulture);

        private static string Pascal(string key) => string.Concat(key.Split('_').Select(p => p.Length == 0 ? p : char.ToUpperInvariant(p[0]) + p.Substring(1)));

        private static Template Load(string name)
        {
            using var stream = typeof(Emitter).Assembly.GetManifestResourceStream("Moe.Generators.Templates." + name)
                ?? throw new FileNotFoundException("embedded template missing", name);
            using var reader = new StreamReader(stream);
            var template = Template.Parse(reader.ReadToEnd(), name);
            if (template.HasErrors) throw new InvalidDataException(string.Join("; ", template.Messages));
            return template;
        }
    }
}
