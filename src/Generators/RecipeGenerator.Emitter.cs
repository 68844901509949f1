using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Text;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.Text;
using Scriban;

namespace Moe.Generators;

public sealed partial class RecipeGenerator
{
    /// <summary>Renders a <see cref="RecipeSpec"/> through the embedded Scriban templates.</summary>
    internal static class Emitter
    {
        private static readonly string Version =
            typeof(RecipeGenerator).Assembly.GetName().Version?.ToString(3) ?? "0.0.0";

        private static readonly ConcurrentDictionary<string, Template> Templates = new(StringComparer.Ordinal);

        public static void Emit(SourceProductionContext context, RecipeSpec spec, bool emitMain)
        {
            context.CancellationToken.ThrowIfCancellationRequested();
            foreach (var (hintName, text) in Render(spec, emitMain))
                context.AddSource(hintName, SourceText.From(text, Encoding.UTF8));
        }

        /// <summary>The generated files for one recipe: hint name and text.</summary>
        public static IReadOnlyList<(string HintName, string Text)> Render(RecipeSpec spec, bool emitMain)
        {
            var files = new List<(string, string)>();
            string prefix = spec.Namespace is null ? spec.ClassName : spec.Namespace + "." + spec.ClassName;
            files.Add((prefix + ".Wiring.g.cs", spec.Layout is { } layout
                ? RenderTemplate("Wiring", WiringModel(spec, layout))
                : RenderTemplate("Fallback", FallbackModel(spec))));
            if (emitMain)
                files.Add((prefix + ".Main.g.cs", RenderTemplate("Main", Common(spec))));
            return files;
        }

        private static Dictionary<string, object?> Common(RecipeSpec spec) => new(StringComparer.Ordinal)
        {
            ["GeneratorVersion"] = Version,
            ["Namespace"] = spec.Namespace,
            ["ClassName"] = spec.ClassName,
            ["RecipeName"] = spec.Namespace is null ? spec.ClassName : spec.Namespace + "." + spec.ClassName,
            ["RecipeType"] = spec.FullyQualifiedName,
            ["RecipeCref"] = spec.FullyQualifiedName.Replace("global::", ""),
            ["Accessibility"] = spec.IsPublic ? "public" : "internal",
            ["ModelName"] = spec.ModelName,
        };

        private static Dictionary<string, object?> FallbackModel(RecipeSpec spec)
        {
            var model = Common(spec);
            model["Reason"] = spec.Findings.Count > 0
                ? "the recipe does not validate (the Moe analyzers report why; see the findings above)."
                : "these settings are not compile-time constants: " + string.Join(", ", spec.Unknown) + ".";
            model["FindingLines"] = spec.Findings.Select(f => f.Replace("\r", " ").Replace("\n", " ")).ToArray();
            return model;
        }

        private static Dictionary<string, object?> WiringModel(RecipeSpec spec, LayoutSpec layout)
        {
            var model = Common(spec);
            model["Gpus"] = I(layout.Gpus);
            model["GpusText"] = Count(layout.Gpus, "GPU");
            model["Tensor"] = I(layout.Tensor);
            model["Pipeline"] = I(layout.Pipeline);
            model["VirtualPipeline"] = I(layout.VirtualPipeline);
            model["Context"] = I(layout.Context);
            model["Expert"] = I(layout.Expert);
            model["ExpertTensor"] = I(layout.ExpertTensor);
            model["DataParallel"] = I(layout.DataParallel);
            model["ExpertDataParallel"] = I(layout.ExpertDataParallel);
            model["SequenceParallel"] = layout.SequenceParallel ? "true" : "false";
            model["Order"] = layout.Order;
            model["Layers"] = I(layout.Layers);
            model["Experts"] = I(layout.Experts);

            // Columns padded to the widest value so the table reads down.
            string[] columns = ["tp", "cp", "dp", "pp", "dp_cp", "ep", "etp", "edp"];
            int width = Math.Max(I(layout.Gpus - 1).Length, columns.Max(c => c.Length));
            model["CoordinatesHeader"] = string.Join("  ", columns.Select(c => c.PadLeft(width)));
            model["CoordinateLines"] = layout.Ranks.Select(r =>
                "new(" + string.Join(", ", new[] { r.Tp, r.Cp, r.Dp, r.Pp, r.DpCp, r.Ep, r.Etp, r.Edp }.Select(v => I(v).PadLeft(width))) +
                "), // rank " + I(r.Rank)).ToArray();

            model["Families"] = layout.Families.Select(f => new Dictionary<string, object?>(StringComparer.Ordinal)
            {
                ["Key"] = f.Key,
                ["Property"] = f.PropertyName,
                ["Summary"] = $"{f.MegatronGroup} (\"{f.Key}\"): {Count(f.Groups.Count, "group")} of {Count(f.Groups[0].Count, "rank")}.",
                ["Lines"] = f.Groups.Select(g => "[" + string.Join(", ", g.Select(I)) + "],").ToArray(),
            }).ToArray();

            model["CreationLines"] = layout.CreationOrder.Select(c =>
                $"new(\"{c.Description}\", \"{c.Backend}\", \"{c.Family}\", {I(c.FirstIndex)}, {I(c.Count)}),").ToArray();
            model["StageLines"] = layout.StageLayers.GroupBy(s => s.Stage)
                .Select(stage => "[" + string.Join(", ", stage.Select(s => $"new({I(s.FirstLayer)}, {I(s.LayerCount)})")) + "], // stage " + I(stage.Key) + ": " +
                    string.Join(", ", stage.Select(s => Range("layer", s.FirstLayer, s.LayerCount))))
                .ToArray();
            model["ExpertLines"] = layout.ExpertRanks.Select(e =>
                $"new({I(e.FirstExpert)}, {I(e.ExpertCount)}), // expert rank {I(e.ExpertRank)}: {Range("expert", e.FirstExpert, e.ExpertCount)}").ToArray();
            return model;
        }

        private static string Range(string noun, int first, int count) =>
            count == 1 ? $"{noun} {I(first)}" : $"{noun}s {I(first)}–{I(first + count - 1)}";

        private static string Count(int n, string noun) => I(n) + " " + (n == 1 ? noun : noun + "s");

        private static string I(int value) => value.ToString(CultureInfo.InvariantCulture);

        private static string RenderTemplate(string name, Dictionary<string, object?> model)
        {
            var template = Templates.GetOrAdd(name, Load);
            var scriptObject = new Scriban.Runtime.ScriptObject();
            foreach (var pair in model) scriptObject.Add(pair.Key, pair.Value);
            // Layouts of 128+ GPUs list more than Scriban's default 1000 loop iterations (0 = no limit).
            var templateContext = new TemplateContext { MemberRenamer = member => member.Name, LoopLimit = 0 };
            templateContext.PushGlobal(scriptObject);
            string text = template.Render(templateContext);
            // Identical output on every OS: the templates are stored with LF, but a checkout may add CR.
            return text.Replace("\r\n", "\n");
        }

        private static Template Load(string name)
        {
            string resource = "Moe.Generators.Templates." + name + ".sbn-cs";
            using var stream = typeof(RecipeGenerator).Assembly.GetManifestResourceStream(resource)
                ?? throw new InvalidOperationException("Missing embedded template " + resource + ".");
            using var reader = new StreamReader(stream);
            var template = Template.Parse(reader.ReadToEnd(), resource);
            if (template.HasErrors)
                throw new InvalidOperationException("Template " + resource + ": " + string.Join("; ", template.Messages));
            return template;
        }
    }
}
