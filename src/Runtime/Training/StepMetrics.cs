using System.Globalization;
using System.Text;
using System.Text.Json;

namespace Moe.Runtime.Training;

/// <summary>
/// One optimizer step's numbers, written as one JSON line (<see cref="ToJson"/>). The positional fields are the
/// trainer's; the init-only ones are filled by whoever knows them: the trainer (routed counts, step time), the
/// observers (<see cref="ITrainingObserver"/>: device memory, MFU, validation loss, health warnings), the
/// distributed runtime (all-to-all time). A field nobody measured stays null and is written as null.
/// </summary>
/// <param name="Step">Optimizer step, from 1.</param>
/// <param name="Loss">LM loss + aux and z losses times their coefficients, the value the backward used.</param>
/// <param name="LmLoss">Next-token cross-entropy over the counted tokens.</param>
/// <param name="AuxLoss">Load-balancing loss before its coefficient.</param>
/// <param name="ZLoss">Router z-loss before its coefficient (0 without one).</param>
/// <param name="Lr">Learning rate of the step.</param>
/// <param name="GradNorm">Global gradient norm before clipping.</param>
/// <param name="TokensPerExpert">[layer][expert] token-expert assignments each expert computed (kept, after capacity drops).</param>
/// <param name="DropRate">Dropped / routed assignments over every layer.</param>
/// <param name="TokensPerSecond">Tokens of the global batch over the step's seconds.</param>
public sealed record StepMetrics(int Step, double Loss, double LmLoss, double AuxLoss, double ZLoss, double Lr, double GradNorm,
    long[][] TokensPerExpert, double DropRate, double TokensPerSecond)
{
    /// <summary>
    /// Version of the metrics line. 1: the first ten fields, no "format" key. 2: adds "format", "run" and the
    /// fields below. Readers refuse a line whose version they do not know.
    /// </summary>
    public const int FormatVersion = 2;

    /// <summary>[layer][expert] assignments the router chose (before capacity drops): what load balance is measured on.</summary>
    public long[][]? RoutedPerExpert { get; init; }

    /// <summary>Wall-clock seconds of the step (forward, backward, optimizer), without evaluation.</summary>
    public double? StepSeconds { get; init; }

    /// <summary>Model FLOPs utilisation against the device's peak; null where the peak is not known (CPU).</summary>
    public double? Mfu { get; init; }

    /// <summary>Device memory in use and in total, bytes; null where the device does not report it (CPU).</summary>
    public long? MemoryUsedBytes { get; init; }

    /// <inheritdoc cref="MemoryUsedBytes"/>
    public long? MemoryTotalBytes { get; init; }

    /// <summary>Seconds of the step spent in the expert-parallel all-to-all; null when not measured (one device).</summary>
    public double? AllToAllSeconds { get; init; }

    /// <summary>Validation loss (token-weighted LM loss over the validation samples), on steps that evaluated.</summary>
    public double? ValLoss { get; init; }

    /// <summary>Health warnings raised at this step (one per signal and episode).</summary>
    public IReadOnlyList<HealthWarning> Warnings { get; init; } = [];

    /// <summary>Why the run stops after this step (a signal in <c>Health.StopOn</c>); null to go on.</summary>
    public string? StopReason { get; init; }

    /// <summary>The run that wrote the line (the run directory's id).</summary>
    public string? RunId { get; init; }

    /// <summary>Share of the step spent in the all-to-all, when both are known.</summary>
    public double? AllToAllShare => AllToAllSeconds is double a && StepSeconds is double s && s > 0 ? a / s : null;

    /// <summary>Share of free device memory, when the device reports it.</summary>
    public double? MemoryHeadroom => MemoryUsedBytes is long used && MemoryTotalBytes is long total && total > 0 ? 1 - (double)used / total : null;

    /// <summary>Per layer: dropped / routed assignments (needs <see cref="RoutedPerExpert"/>).</summary>
    public double[]? DropRatePerLayer => RoutedPerExpert is null ? null
        : RoutedPerExpert.Select((routed, l) =>
        {
            long r = routed.Sum(), k = l < TokensPerExpert.Length ? TokensPerExpert[l].Sum() : 0;
            return r > 0 ? 1 - (double)k / r : 0;
        }).ToArray();

    /// <summary>The JSON line; a non-finite number (JSON has none) is written as null.</summary>
    public string ToJson()
    {
        static object? N(double? v) => v is double d && double.IsFinite(d) ? d : null;
        var o = new Dictionary<string, object?>
        {
            ["format"] = FormatVersion,
            ["run"] = RunId,
            ["step"] = Step,
            ["loss"] = N(Loss),
            ["lm_loss"] = N(LmLoss),
            ["aux_loss"] = N(AuxLoss),
            ["z_loss"] = N(ZLoss),
            ["lr"] = N(Lr),
            ["grad_norm"] = N(GradNorm),
            ["tokens_per_expert"] = TokensPerExpert,
            ["routed_per_expert"] = RoutedPerExpert,
            ["drop_rate"] = N(DropRate),
            ["tokens_per_s"] = N(TokensPerSecond),
            ["step_s"] = N(StepSeconds),
            ["mfu"] = N(Mfu),
            ["mem_used_bytes"] = MemoryUsedBytes,
            ["mem_total_bytes"] = MemoryTotalBytes,
            ["a2a_s"] = N(AllToAllSeconds),
            ["val_loss"] = N(ValLoss),
            ["warnings"] = Warnings.Select(w => new Dictionary<string, object> { ["signal"] = w.Signal.ToString(), ["message"] = w.Message }).ToArray(),
            ["stop"] = StopReason,
        };
        return JsonSerializer.Serialize(o);
    }

    public string ToProgressLine(int totalSteps) => string.Create(CultureInfo.InvariantCulture,
        $"step {Step}/{totalSteps}  loss {Loss:F4}  lm {LmLoss:F4}  aux {AuxLoss:F4}") +
        (ValLoss is double v ? string.Create(CultureInfo.InvariantCulture, $"  val {v:F4}") : "") +
        string.Create(CultureInfo.InvariantCulture, $"  lr {Lr:E2}  grad {GradNorm:F3}  drop {DropRate:P1}  {TokensPerSecond:F0} tok/s");
}

/// <summary>A health signal that left its range: which one, and the line printed (value, bound, setting to change).</summary>
public sealed record HealthWarning(Dsl.HealthSignal Signal, string Message);

/// <summary>
/// Writes metrics lines to a file, flushed after every step so a crash loses nothing already done. A file that
/// already holds lines belongs to another run: it is refused unless <c>append</c> is asked for (then this run's
/// lines follow, told apart by their "run" id).
/// </summary>
public sealed class MetricsWriter : ITrainingObserver, IDisposable
{
    private readonly StreamWriter? _writer;
    private readonly string? _runId;

    public MetricsWriter(string? path, string? runId = null, bool append = false)
    {
        _runId = runId;
        if (path is null) return;
        string full = Path.GetFullPath(path);
        if (Directory.Exists(full))
            throw new UserError($"The metrics file {path} is a directory; name a file (e.g. {Path.Combine(path, "metrics.jsonl")}).");
        if (!append && File.Exists(full) && new FileInfo(full).Length > 0)
            throw new UserError($"The metrics file {path} already holds the metrics of another run ({Describe(full)}); choose another --metrics file or --run-dir, or pass --append-metrics to add this run after it.");
        string? dir = Path.GetDirectoryName(full);
        try
        {
            if (dir is not null) Directory.CreateDirectory(dir);
            _writer = new StreamWriter(new FileStream(full, FileMode.Append, FileAccess.Write), new UTF8Encoding(false));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new UserError($"The metrics file {path} cannot be written: {e.Message}");
        }
    }

    private static string Describe(string path)
    {
        string? first = File.ReadLines(path).FirstOrDefault();
        try
        {
            using var doc = JsonDocument.Parse(first ?? "");
            return doc.RootElement.TryGetProperty("run", out var run) && run.ValueKind == JsonValueKind.String
                ? $"run {run.GetString()}"
                : "written in metrics format 1, before runs had ids";
        }
        catch (JsonException)
        {
            return "its first line is not a metrics line";
        }
    }

    public StepMetrics StepEnded(StepMetrics m)
    {
        if (_writer is null) return m;
        _writer.WriteLine((m.RunId is null && _runId is not null ? m with { RunId = _runId } : m).ToJson());
        _writer.Flush();
        return m;
    }

    public void Dispose() => _writer?.Dispose();
}
