using System.Globalization;
using System.IO;
using System.Linq;
using Moe.Dsl.Layout;
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
            var order = RankLayout.ParseOrder(spec.Order) ?? throw new InvalidDataException($"order {spec.Order}");
            var layout = new RankLayout(spec.Gpus, spec.Tensor, spec.Pipeline, spec.Context, spec.Expert, spec.ExpertTensor, order);
            // Tables only up to the limit: their size grows with the world (about 400 bytes a rank).
            bool tabulated = spec.Gpus <= spec.WiringTableLimit;
            var model = new
            {
                spec.Namespace,
                spec.ClassName,
                spec.ModelName,
                Gpus = I(spec.Gpus),
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
                OrderMember = order.ToString(),
                Tabulated = tabulated,
                TableLimit = I(spec.WiringTableLimit),
                DenseAxes = Axes(layout.DenseGrid),
                ExpertAxes = Axes(layout.ExpertGrid),
                Families = !tabulated ? null : RankLayout.FamilyKeys.Select(key => new
                {
                    Key = key,
                    Name = Pascal(key),
                    Groups = Enumerable.Range(0, layout.GroupCount(key)).Select(g => "new[] { " + string.Join(", ", layout.Group(key, g).Select(I)) + " }").ToArray(),
                }).ToArray(),
                Coordinates = !tabulated ? null : Enumerable.Range(0, layout.World).Select(r =>
                {
                    var c = layout.Coordinates(r);
                    return $"new({I(c.Tp)}, {I(c.Cp)}, {I(c.Dp)}, {I(c.Pp)}, {I(c.DpCp)}, {I(c.Ep)}, {I(c.Etp)}, {I(c.Edp)}), // rank {I(r)}";
                }).ToArray(),
                Creation = !tabulated ? null : layout.CreationOrder.Select(c => $"new(\"{c.Description}\", \"{c.Backend}\", \"{c.GroupsKey}\", {I(c.FirstIndex)}, {I(c.Count)}),").ToArray(),
                FamilySummary = tabulated ? null : FamilySummary(layout),
                Stages = spec.StageLayers.Select((ranges, stage) => "new LayerRange[] { " + string.Join(", ", ranges.Select(r => $"new({I(r.Start)}, {I(r.Count)})")) + $" }}, // stage {I(stage)}").ToArray(),
                Experts = spec.ExpertsOfRank.Select((r, rank) => $"new({I(r.Start)}, {I(r.Count)}), // ep rank {I(rank)}").ToArray(),
            };
            return Render(WiringTemplate, model);
        }

        /// <summary>One line per family for the compact form: key, groups × ranks, the first group (elided past 8 ranks).</summary>
        private static string[] FamilySummary(RankLayout layout)
        {
            int countWidth = I(layout.World).Length;
            return RankLayout.FamilyKeys.Select(key =>
            {
                var first = layout.Group(key, 0);
                string members = first.Length <= 8
                    ? string.Join(", ", first.Select(I))
                    : string.Join(", ", first.Take(6).Select(I)) + ", …, " + I(first[first.Length - 1]);
                return $"{key.PadRight(20)}{I(layout.GroupCount(key)).PadLeft(countWidth)} × {I(first.Length).PadRight(countWidth)}  [{members}]";
            }).ToArray();
        }

        private static string[] Axes(RankGrid grid) => grid.Axes
            .Select((a, i) => $"new GridAxis(\"{a.Name}\", {I(a.Size)}, {I(a.Stride)})" + (i == grid.Axes.Count - 1 ? ");" : ","))
            .ToArray();

        public static string EntryPoint(RecipeSpec spec) =>
            Render(EntryPointTemplate, new { Type = spec.Namespace.Length == 0 ? "global::" + spec.ClassName : $"global::{spec.Namespace}.{spec.ClassName}", HasWiring = spec.LayoutKnown });

        private static string Render(Template template, object model)
        {
            var globals = new ScriptObject();
            globals.Import(model, renamer: m => m.Name);
            // No loop limit: 128 GPUs give more than Scriban's default 1000 iterations (coordinates, creation runs).
            // No output limit either: Scriban 7 cuts the rendered text at LimitToString (1,048,576 characters by
            // default) and appends "...", which is how an 8192-GPU table once became a file that did not compile.
            // Our templates and data are our own and the table limit bounds the size; the limits are off, and set
            // to throw rather than truncate should a later change turn one back on.
            var context = new TemplateContext
            {
                MemberRenamer = m => m.Name,
                LoopLimit = 0,
                LimitToString = 0,
                OutputLimit = 0,
                OnStringLimit = ScriptLimitBehavior.Throw,
                OnOutputLimit = ScriptLimitBehavior.Throw,
            };
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
