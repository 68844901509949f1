using Moe.Dsl;
using Moe.Runtime.Commands;
using Moe.Runtime.Training;
using Xunit;

namespace Moe.Runtime.Tests.Monitoring;

/// <summary>moe report: the page and its PNGs from a run's metrics, and the inputs it must refuse.</summary>
[Collection("Console")]
public class ReportTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-report-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static (int Exit, string Out, string Err) Report(params string[] args) => Moe.Tests.ConsoleCapture.Run(() =>
        MoeCommands.Run(MoeCommands.CreateRoot(), ["report", .. args]));

    /// <summary>A 40-step run of 2 layers × 4 experts whose layer 1 collapses onto experts 0 and 2 after step 20.</summary>
    private string WriteRun()
    {
        string run = Path.Combine(_dir, "run");
        Directory.CreateDirectory(run);
        var lines = Enumerable.Range(1, 40).Select(step =>
        {
            long[] layer1 = step <= 20 ? [260, 240, 250, 250] : [500, 0, 500, 0];
            var m = new StepMetrics(step, 7 - step * 0.05, 7 - step * 0.05, 1, 0, 1e-3 * Math.Min(1, step / 10.0), 1.5, [[250, 250, 250, 250], layer1],
                step <= 20 ? 0 : 0.1, 5000 + step)
            {
                RunId = "run-1",
                RoutedPerExpert = [[250, 250, 250, 250], layer1],
                ValLoss = step % 10 == 0 ? 7.2 - step * 0.04 : null,
                Warnings = step == 21 ? [new HealthWarning(HealthSignal.RouterCollapse, "router collapse in layer 1: experts 0, 2 take 100 %")] : [],
            };
            return m.ToJson();
        });
        File.WriteAllLines(Path.Combine(run, "metrics.jsonl"), lines);
        File.WriteAllText(Path.Combine(run, "recipe.json"), """{ "Name": "TinyMixtral", "TopK": 2 }""");
        return run;
    }

    [Fact]
    public void Run_WritesASelfContainedPageAndPngCharts()
    {
        string run = WriteRun();
        var (exit, output, err) = Report(run);
        Assert.True(exit == 0, output + err);
        string dir = Path.Combine(run, "report");
        foreach (var png in new[] { "loss.png", "lr.png", "grad_norm.png", "drop_rate.png", "throughput.png", "expert_load.png" })
        {
            var bytes = File.ReadAllBytes(Path.Combine(dir, png));
            Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A }, bytes[..8]);
            Assert.Equal(900, System.Buffers.Binary.BinaryPrimitives.ReadInt32BigEndian(bytes.AsSpan(16, 4)));   // IHDR width
        }
        Assert.Empty(Directory.GetFiles(dir, "*.tmp*"));
        string page = File.ReadAllText(Path.Combine(dir, "report.html"));
        Assert.Equal(6, System.Text.RegularExpressions.Regex.Matches(page, "src=\"data:image/png;base64,").Count);
        Assert.DoesNotContain("src=\"loss.png\"", page);   // self-contained: no file links
        Assert.Contains("router collapse in layer 1: experts 0, 2 take 100 %", page);
        Assert.Contains("Training report: TinyMixtral", page);
        Assert.Contains("4 evaluations", page);
    }

    [Fact]
    public void HeatMap_PutsEachLayerAndExpertOnItsLabelledRow()
    {
        // WriteRun: from step 21 layer 1 routes [500, 0, 500, 0]: experts 0 and 2 carry 2× the mean, 1 and 3 nothing.
        var steps = Moe.Runtime.Monitoring.MetricsFile.Read(Path.Combine(WriteRun(), "metrics.jsonl"))[^1].Steps;
        var (plot, _, height) = Moe.Runtime.Monitoring.ReportCharts.HeatMap(steps, topK: 2)!.Value;
        using var bitmap = SkiaSharp.SKBitmap.Decode(plot.GetImage(900, height).GetImageBytes());
        SkiaSharp.SKColor At(double step, double row)
        {
            var p = plot.GetPixel(new ScottPlot.Coordinates(step, row));
            return bitmap.GetPixel((int)p.X, (int)p.Y);
        }
        // Rows: L0 E0..E3 at y 0.5..3.5, L1 E0..E3 at 4.5..7.5. Turbo runs from dark blue-violet (0) to dark red (2).
        foreach (var (row, hot) in new[] { (4.5, true), (5.5, false), (6.5, true), (7.5, false) })
        {
            var c = At(30, row);
            Assert.True(hot ? c.Red > 2 * c.Blue : c.Blue > c.Red, $"row {row} at step 30: {c}");
        }
        var before = At(10, 5.5);   // layer 1 expert 1 before the collapse: 240/250 = 0.96, near the middle (green)
        Assert.True(before.Green > before.Red && before.Green > before.Blue, $"{before}");
    }

    [Fact]
    public void DirectoryWithoutMetrics_IsAClearError()
    {
        var (exit, _, err) = Report(_dir);
        Assert.Equal(2, exit);
        Assert.Contains("holds no metrics: metrics.jsonl is missing", err);
        (exit, _, err) = Report(Path.Combine(_dir, "nothing-here"));
        Assert.Equal(2, exit);
        Assert.Contains("is not a directory", err);
    }

    [Fact]
    public void MetricsOfTheOlderFormat_AreRefusedByName()
    {
        // Format 1, as written before this change: no "format", no "run".
        File.WriteAllText(Path.Combine(_dir, "metrics.jsonl"),
            """{"step":1,"loss":6.9,"lm_loss":6.9,"aux_loss":4,"z_loss":0,"lr":0.001,"grad_norm":1,"tokens_per_expert":[[1,2]],"drop_rate":0,"tokens_per_s":100}""" + "\n");
        var (exit, _, err) = Report(_dir);
        Assert.Equal(2, exit);
        Assert.Contains("is a metrics file from an older format (format 1", err);
        Assert.False(Directory.Exists(Path.Combine(_dir, "report")));
    }
}
