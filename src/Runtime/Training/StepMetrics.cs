using System.Globalization;
using System.Text;
using System.Text.Json;

namespace Moe.Runtime.Training;

/// <summary>One optimizer step's numbers, written as one JSON line.</summary>
public sealed record StepMetrics(int Step, double Loss, double LmLoss, double AuxLoss, double ZLoss, double Lr, double GradNorm,
    long[][] TokensPerExpert, double DropRate, double TokensPerSecond)
{
    /// <summary>The JSON line; a non-finite number (JSON has none) is written as null.</summary>
    public string ToJson()
    {
        static object? N(double v) => double.IsFinite(v) ? v : null;
        var o = new Dictionary<string, object?>
        {
            ["step"] = Step,
            ["loss"] = N(Loss),
            ["lm_loss"] = N(LmLoss),
            ["aux_loss"] = N(AuxLoss),
            ["z_loss"] = N(ZLoss),
            ["lr"] = N(Lr),
            ["grad_norm"] = N(GradNorm),
            ["tokens_per_expert"] = TokensPerExpert,
            ["drop_rate"] = N(DropRate),
            ["tokens_per_s"] = N(TokensPerSecond),
        };
        return JsonSerializer.Serialize(o);
    }

    public string ToProgressLine(int totalSteps) => string.Create(CultureInfo.InvariantCulture,
        $"step {Step}/{totalSteps}  loss {Loss:F4}  lm {LmLoss:F4}  aux {AuxLoss:F4}  lr {Lr:E2}  grad {GradNorm:F3}  drop {DropRate:P1}  {TokensPerSecond:F0} tok/s");
}

/// <summary>Appends metrics lines to a file, flushed after every step so a crash loses nothing already done.</summary>
public sealed class MetricsWriter : IDisposable
{
    private readonly StreamWriter? _writer;

    public MetricsWriter(string? path)
    {
        if (path is null) return;
        string? dir = Path.GetDirectoryName(Path.GetFullPath(path));
        if (dir is not null) Directory.CreateDirectory(dir);
        _writer = new StreamWriter(new FileStream(path, FileMode.Append, FileAccess.Write), new UTF8Encoding(false));
    }

    public void Write(StepMetrics m)
    {
        if (_writer is null) return;
        _writer.WriteLine(m.ToJson());
        _writer.Flush();
    }

    public void Dispose() => _writer?.Dispose();
}
