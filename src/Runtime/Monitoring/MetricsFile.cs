using System.Text.Json;
using Moe.Dsl;
using Moe.Runtime.Training;

namespace Moe.Runtime.Monitoring;

/// <summary>One run's steps as read back from a metrics file.</summary>
public sealed record MetricsRun(string? RunId, IReadOnlyList<StepMetrics> Steps);

/// <summary>
/// Reads metrics.jsonl (<see cref="StepMetrics.ToJson"/>, format <see cref="StepMetrics.FormatVersion"/>). A file
/// may hold several runs (<c>--append-metrics</c>), told apart by their "run" id; lines of an older or newer format
/// are refused with the format named, never half-read.
/// </summary>
public static class MetricsFile
{
    /// <summary>The runs in the file, in the order they were written.</summary>
    public static IReadOnlyList<MetricsRun> Read(string path)
    {
        if (!File.Exists(path)) throw new UserError($"{path} does not exist: this directory holds no metrics. Point moe report at a run directory that `train` wrote (it holds {RunDirectory.MetricsFile}).");
        var runs = new List<(string? Id, List<StepMetrics> Steps)>();
        int number = 0;
        foreach (string line in File.ReadLines(path))
        {
            number++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            StepMetrics step;
            try
            {
                using var doc = JsonDocument.Parse(line);
                step = Parse(doc.RootElement, path, number);
            }
            catch (JsonException e)
            {
                throw new UserError($"{path} line {number} is not a JSON metrics line ({e.Message}); the file is damaged or not a metrics file.");
            }
            if (runs.Count == 0 || runs[^1].Id != step.RunId) runs.Add((step.RunId, []));
            runs[^1].Steps.Add(step);
        }
        if (runs.Count == 0) throw new UserError($"{path} is empty: the run wrote no step (did it fail before its first step?).");
        return runs.Select(r => new MetricsRun(r.Id, r.Steps)).ToArray();
    }

    private static StepMetrics Parse(JsonElement o, string path, int line)
    {
        if (o.ValueKind != JsonValueKind.Object || !o.TryGetProperty("step", out _))
            throw new UserError($"{path} line {line} is not a metrics line (no \"step\").");
        if (!o.TryGetProperty("format", out var format))
            throw new UserError($"{path} is a metrics file from an older format (format 1, written before metrics lines carried \"format\" and a run id): moe report reads format {StepMetrics.FormatVersion}. Train again with this version to get a report.");
        if (format.ValueKind != JsonValueKind.Number || format.GetInt32() != StepMetrics.FormatVersion)
            throw new UserError($"{path} line {line} is in metrics format {format}, which this moe (format {StepMetrics.FormatVersion}) does not read; use the moe that wrote it.");
        double D(string key) => o.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetDouble() : double.NaN;
        double? N(string key) => o.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetDouble() : null;
        long? L(string key) => o.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetInt64() : null;
        long[][]? Counts(string key) => o.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.Array
            ? v.EnumerateArray().Select(layer => layer.EnumerateArray().Select(e => e.GetInt64()).ToArray()).ToArray()
            : null;
        var warnings = o.TryGetProperty("warnings", out var w) && w.ValueKind == JsonValueKind.Array
            ? w.EnumerateArray().Select(x => new HealthWarning(
                Enum.TryParse<HealthSignal>(x.GetProperty("signal").GetString(), out var signal) ? signal : HealthSignal.None,
                x.GetProperty("message").GetString() ?? "")).ToArray()
            : [];
        return new StepMetrics(o.GetProperty("step").GetInt32(), D("loss"), D("lm_loss"), D("aux_loss"), D("z_loss"), D("lr"), D("grad_norm"),
            Counts("tokens_per_expert") ?? [], D("drop_rate"), D("tokens_per_s"))
        {
            RunId = o.TryGetProperty("run", out var run) && run.ValueKind == JsonValueKind.String ? run.GetString() : null,
            RoutedPerExpert = Counts("routed_per_expert"),
            StepSeconds = N("step_s"),
            Mfu = N("mfu"),
            MemoryUsedBytes = L("mem_used_bytes"),
            MemoryTotalBytes = L("mem_total_bytes"),
            AllToAllSeconds = N("a2a_s"),
            ValLoss = N("val_loss"),
            Warnings = warnings,
            StopReason = o.TryGetProperty("stop", out var stop) && stop.ValueKind == JsonValueKind.String ? stop.GetString() : null,
        };
    }
}
