using System.Globalization;
using System.Net;
using System.Text;
using System.Text.Json;
using Moe.Runtime.Monitoring;
using Moe.Runtime.Training;

namespace Moe.Runtime.Commands.Report;

/// <summary>
/// <c>moe report RUN_DIR</c>: reads the run's metrics.jsonl (and recipe.json, environment.json when present) and
/// writes report.html — one page with every chart embedded as a PNG data URI, so it can be mailed or archived
/// alone — plus the same PNGs beside it (<see cref="ReportCharts"/>). A metrics file holding several runs
/// (<c>--append-metrics</c>) is reported for its last run.
/// </summary>
public static class ReportCommand
{
    public const string PageFile = "report.html";

    public static int Execute(string runDir, string? outputDir, TextWriter output)
    {
        if (!Directory.Exists(runDir))
            throw new UserError($"{runDir} is not a directory; pass the run directory `train` wrote (runs/<recipe>-<time> by default).");
        string metricsPath = Path.Combine(runDir, RunDirectory.MetricsFile);
        if (!File.Exists(metricsPath))
            throw new UserError($"{runDir} holds no metrics: {RunDirectory.MetricsFile} is missing. Pass the run directory `train` wrote (or the directory of a --metrics file named {RunDirectory.MetricsFile}).");
        var runs = MetricsFile.Read(metricsPath);
        var run = runs[^1];
        string outDir = outputDir ?? Path.Combine(runDir, "report");
        try
        {
            Directory.CreateDirectory(outDir);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new UserError($"The report directory {outDir} cannot be created: {e.Message}. Choose another with --out DIR.");
        }
        var recipe = ReadJson(Path.Combine(runDir, RunDirectory.RecipeFile));
        var environment = ReadJson(Path.Combine(runDir, RunDirectory.EnvironmentFile));
        int? topK = recipe?.RootElement.TryGetProperty("TopK", out var k) == true && k.ValueKind == JsonValueKind.Number ? k.GetInt32() : null;
        var charts = ReportCharts.Draw(run.Steps, outDir, topK);
        string page = Page(run, runs.Count, charts, outDir, recipe, environment);
        string path = Path.Combine(outDir, PageFile), tmp = path + ".tmp";
        File.WriteAllText(tmp, page, new UTF8Encoding(false));
        File.Move(tmp, path, overwrite: true);
        output.WriteLine($"wrote {path} and {charts.Count} charts ({string.Join(", ", charts.Select(c => c.File))})" +
            (runs.Count > 1 ? $"; {metricsPath} holds {runs.Count} runs, this report shows the last ({run.RunId})" : ""));
        return 0;
    }

    private static JsonDocument? ReadJson(string path)
    {
        if (!File.Exists(path)) return null;
        try
        {
            return JsonDocument.Parse(File.ReadAllText(path));
        }
        catch (JsonException e)
        {
            throw new UserError($"{path} is not valid JSON ({e.Message}); it should be what `train` wrote. Move it away to report without it.");
        }
    }

    private static string Page(MetricsRun run, int runCount, IReadOnlyList<ReportCharts.Chart> charts, string outDir, JsonDocument? recipe, JsonDocument? environment)
    {
        var steps = run.Steps;
        static string H(string? s) => WebUtility.HtmlEncode(s ?? "");
        static string F(double v, string format) => double.IsFinite(v) ? v.ToString(format, CultureInfo.InvariantCulture) : "–";
        string recipeName = recipe?.RootElement.TryGetProperty("Name", out var n) == true ? n.GetString() ?? "" : "";
        var val = steps.Where(s => s.ValLoss is not null).ToArray();
        var warnings = steps.SelectMany(s => s.Warnings.Select(w => (s.Step, w))).ToArray();
        var timed = steps.Count > 1 ? steps.Skip(1) : steps;   // the first step includes start-up work

        var sb = new StringBuilder();
        sb.Append("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n")
          .Append($"<title>Moe report: {H(recipeName)} {H(run.RunId)}</title>\n")
          .Append("<style>body{font-family:'DejaVu Sans',Arial,sans-serif;margin:2em auto;max-width:960px;color:#222}" +
                  "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}" +
                  "th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;font-size:90%}" +
                  ".warn{color:#8a4b00}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:85%}</style>\n</head><body>\n")
          .Append($"<h1>Training report: {H(recipeName.Length > 0 ? recipeName : "run")}</h1>\n")
          .Append($"<p>Run <code>{H(run.RunId ?? "(no id)")}</code>")
          .Append(runCount > 1 ? $" — the last of the {runCount} runs in its metrics file." : ".").Append("</p>\n");

        sb.Append("<h2>Summary</h2>\n<table>\n");
        void Row(string label, string value) => sb.Append($"<tr><th>{H(label)}</th><td>{value}</td></tr>\n");
        Row("steps", $"{steps[0].Step}–{steps[^1].Step} ({steps.Count})");
        Row("lm loss", $"{F(steps.Take(5).Average(s => s.LmLoss), "F4")} (first 5 steps) → {F(steps.TakeLast(5).Average(s => s.LmLoss), "F4")} (last 5 steps)");
        Row("validation loss", val.Length == 0 ? "not evaluated" : $"{F(val[^1].ValLoss!.Value, "F4")} at step {val[^1].Step} (best {F(val.Min(s => s.ValLoss!.Value), "F4")}; {val.Length} evaluations)");
        Row("tokens / s", $"{F(timed.Average(s => s.TokensPerSecond), "F0")} (mean after step 1)" + (steps.Any(s => s.Mfu is not null) ? $", MFU {F(timed.Where(s => s.Mfu is not null).Average(s => s.Mfu!.Value) * 100, "F1")} %" : ""));
        Row("token drop rate", $"{F(steps.Average(s => s.DropRate) * 100, "F2")} % (mean), {F(steps.Max(s => s.DropRate) * 100, "F2")} % (highest)");
        if (steps.Any(s => s.MemoryUsedBytes is not null))
            Row("device memory", $"{F(steps.Max(s => s.MemoryUsedBytes ?? 0) / (double)(1L << 30), "F1")} GiB at most, of {F((steps.First(s => s.MemoryTotalBytes is not null).MemoryTotalBytes ?? 0) / (double)(1L << 30), "F1")} GiB");
        Row("health warnings", warnings.Length == 0 ? "none" : $"<span class=\"warn\">{warnings.Length}</span> (below)");
        if (steps[^1].StopReason is string stop) Row("stopped", $"<span class=\"warn\">{H(stop)}</span>");
        sb.Append("</table>\n");

        if (warnings.Length > 0)
        {
            sb.Append("<h2>Health warnings</h2>\n<table><tr><th>step</th><th>signal</th><th>warning</th></tr>\n");
            foreach (var (step, w) in warnings) sb.Append($"<tr><td>{step}</td><td>{H(w.Signal.ToString())}</td><td class=\"warn\">{H(w.Message)}</td></tr>\n");
            sb.Append("</table>\n");
        }

        sb.Append("<h2>Charts</h2>\n");
        foreach (var c in charts)
        {
            string data = Convert.ToBase64String(File.ReadAllBytes(Path.Combine(outDir, c.File)));
            sb.Append($"<figure><img alt=\"{H(c.Title)}\" src=\"data:image/png;base64,{data}\"><figcaption>{H(c.Title)}: {H(c.Caption)} ({H(c.File)})</figcaption></figure>\n");
        }

        if (environment is not null)
        {
            sb.Append("<h2>Environment</h2>\n<table>\n");
            foreach (var p in environment.RootElement.EnumerateObject())
                Row(p.Name, H(p.Value.ValueKind == JsonValueKind.Array ? string.Join(" ", p.Value.EnumerateArray().Select(e => e.ToString())) : p.Value.ToString()));
            sb.Append("</table>\n");
        }
        if (recipe is not null)
            sb.Append("<h2>Recipe</h2>\n<details><summary>The resolved recipe (after command-line overrides)</summary><pre>")
              .Append(H(JsonSerializer.Serialize(recipe.RootElement, new JsonSerializerOptions { WriteIndented = true }))).Append("</pre></details>\n");
        sb.Append("</body></html>\n");
        return sb.ToString();
    }
}
