using Moe.Runtime.Training;
using ScottPlot;

namespace Moe.Runtime.Monitoring;

/// <summary>
/// The pictures of <c>moe report</c>, drawn with ScottPlot (SkiaSharp underneath) as PNG files: loss with validation
/// loss, learning rate, gradient norm, token-drop rate (overall and per layer), throughput (and MFU where known),
/// and the expert-load heat map — one row per layer and expert, one column per step (or per group of steps on long
/// runs), coloured by the expert's routed tokens over its layer's mean (1 = its fair share).
/// </summary>
public static class ReportCharts
{
    private const int Width = 900, Height = 420;

    /// <summary>Most columns of the heat map: longer runs average neighbouring steps.</summary>
    public const int MaxHeatMapColumns = 300;

    /// <summary>Each chart: its file name, title, and a one-line caption for the page.</summary>
    public sealed record Chart(string File, string Title, string Caption);

    /// <summary>Draws every chart the steps have data for into <paramref name="directory"/>.</summary>
    /// <param name="steps">The run's steps.</param>
    /// <param name="directory">Where the PNG files go.</param>
    /// <param name="topK">The router's k (recipe.json), which bounds the heat map's scale at Experts / k; null: 2, Mixtral's.</param>
    public static IReadOnlyList<Chart> Draw(IReadOnlyList<StepMetrics> steps, string directory, int? topK = null)
    {
        var charts = new List<Chart>();
        double[] x = steps.Select(s => (double)s.Step).ToArray();

        var loss = NewPlot("Loss", "loss");
        Line(loss, x, steps.Select(s => s.LmLoss), "train (lm loss)");
        var val = steps.Where(s => s.ValLoss is not null).ToArray();
        if (val.Length > 0)
        {
            var v = loss.Add.Scatter(val.Select(s => (double)s.Step).ToArray(), val.Select(s => s.ValLoss!.Value).ToArray());
            v.LegendText = "validation";
            v.MarkerSize = 8;
            v.LineWidth = 2;
        }
        loss.ShowLegend(Alignment.UpperRight);
        charts.Add(Save(loss, directory, "loss.png", "Loss", val.Length > 0 ? "Training LM loss per step, validation loss at each evaluation." : "Training LM loss per step (the run evaluated no validation loss)."));

        var lr = NewPlot("Learning rate", "lr");
        Line(lr, x, steps.Select(s => s.Lr), "lr");
        charts.Add(Save(lr, directory, "lr.png", "Learning rate", "Warm-up, then the decay schedule."));

        var grad = NewPlot("Gradient norm", "‖g‖ before clipping");
        Line(grad, x, steps.Select(s => s.GradNorm), "grad norm");
        charts.Add(Save(grad, directory, "grad_norm.png", "Gradient norm", "Global gradient norm before clipping."));

        var drop = NewPlot("Token drop rate", "dropped / routed");
        Line(drop, x, steps.Select(s => s.DropRate), "all layers").LineWidth = 2;
        int layers = steps[^1].RoutedPerExpert?.Length ?? 0;
        if (layers > 1 && layers <= 16 && steps.All(s => s.DropRatePerLayer?.Length == layers))
            for (int l = 0; l < layers; l++) Line(drop, x, steps.Select(s => s.DropRatePerLayer![l]), $"layer {l}").LineWidth = 1;
        drop.Axes.SetLimitsY(0, Math.Max(0.05, steps.Max(s => double.IsFinite(s.DropRate) ? s.DropRate : 0) * 1.1));
        drop.ShowLegend(Alignment.UpperRight);
        charts.Add(Save(drop, directory, "drop_rate.png", "Token drop rate", "Share of routed token-expert assignments dropped by capacity (0 when dropless)."));

        var tput = NewPlot("Throughput", "tokens / s");
        Line(tput, x, steps.Select(s => s.TokensPerSecond), "tokens/s");
        if (steps.Any(s => s.Mfu is not null))
        {
            var mfu = tput.Add.Scatter(x, steps.Select(s => (s.Mfu ?? double.NaN) * 100).ToArray());
            mfu.LegendText = "MFU %";
            mfu.MarkerSize = 0;
            mfu.Axes.YAxis = tput.Axes.Right;
            tput.Axes.Right.Label.Text = "MFU (%)";
        }
        tput.ShowLegend(Alignment.LowerRight);
        charts.Add(Save(tput, directory, "throughput.png", "Throughput", "Tokens per second of each step" + (steps.Any(s => s.Mfu is not null) ? ", and model FLOPs utilisation." : " (MFU is not known on the CPU).")));

        if (HeatMap(steps, topK ?? 2) is { } heat) charts.Add(Save(heat.Plot, directory, "expert_load.png", "Expert load", heat.Caption, height: heat.Height));
        return charts;
    }

    /// <summary>The expert-load heat map (null without per-expert counts); public so a test can read its pixels.</summary>
    public static (Plot Plot, string Caption, int Height)? HeatMap(IReadOnlyList<StepMetrics> steps, int topK)
    {
        var counts = steps.Select(s => s.RoutedPerExpert ?? s.TokensPerExpert).ToArray();
        int layers = counts[^1].Length;
        if (layers == 0 || counts.Any(c => c.Length != layers)) return null;
        int experts = counts[^1][0].Length;
        int rows = layers * experts;
        int columns = Math.Min(steps.Count, MaxHeatMapColumns);
        var data = new double[rows, columns];
        for (int col = 0; col < columns; col++)
        {
            int from = (int)((long)col * steps.Count / columns), to = (int)((long)(col + 1) * steps.Count / columns);
            for (int l = 0; l < layers; l++)
            {
                var sum = new double[experts];
                for (int i = from; i < to; i++)
                    for (int e = 0; e < experts; e++) sum[e] += counts[i][l][e];
                double mean = sum.Sum() / experts;
                for (int e = 0; e < experts; e++) data[l * experts + e, col] = mean > 0 ? sum[e] / mean : double.NaN;
            }
        }
        var plot = NewPlot("Expert load (routed tokens / layer mean)", "");
        var hm = plot.Add.Heatmap(data);
        hm.Colormap = new ScottPlot.Colormaps.Turbo();
        // Cell (row r, column c) covers x ∈ [first step of c, last step of c], y ∈ [r, r + 1], row 0 (layer 0, expert 0) at the top.
        // The y axis runs downwards (limits below), so the image is flipped to keep data row 0 at y = 0.
        hm.Extent = new CoordinateRect(steps[0].Step - 0.5, steps[^1].Step + 0.5, rows, 0);
        hm.FlipVertically = true;
        hm.ManualRange = new ScottPlot.Range(0, Math.Max(1.5, (double)experts / Math.Max(1, topK)));   // top-k of E: at most E / k times the mean
        var bar = plot.Add.ColorBar(hm);
        bar.Label = "load / mean";
        var positions = Enumerable.Range(0, rows).Select(r => r + 0.5).ToArray();
        var labels = Enumerable.Range(0, rows).Select(r => r % experts == 0 || experts <= 8 ? $"L{r / experts} E{r % experts}" : $"E{r % experts}").ToArray();
        if (rows <= 64) plot.Axes.Left.SetTicks(positions, labels);
        else plot.Axes.Left.SetTicks(Enumerable.Range(0, layers).Select(l => l * experts + 0.5).ToArray(), Enumerable.Range(0, layers).Select(l => $"L{l}").ToArray());
        for (int l = 1; l < layers; l++)
        {
            var sep = plot.Add.HorizontalLine(l * experts);
            sep.Color = Colors.White;
            sep.LineWidth = 2;
        }
        plot.Axes.SetLimits(steps[0].Step - 0.5, steps[^1].Step + 0.5, rows, 0);
        plot.Axes.Left.Label.Text = "layer, expert";
        string caption = $"Rows: {layers} layers × {experts} experts; columns: " +
            (columns == steps.Count ? "one per step" : $"{columns} groups of about {steps.Count / columns} steps") +
            ". Colour: the expert's routed tokens over its layer's mean per expert (1 = uniform routing).";
        return (plot, caption, Math.Clamp(120 + rows * 14, 320, 1600));
    }

    private static Plot NewPlot(string title, string yLabel)
    {
        var plot = new Plot();
        plot.Font.Set("DejaVu Sans");
        plot.Title(title);
        plot.XLabel("step");
        if (yLabel.Length > 0) plot.YLabel(yLabel);
        return plot;
    }

    private static ScottPlot.Plottables.Scatter Line(Plot plot, double[] x, IEnumerable<double> y, string legend)
    {
        var s = plot.Add.Scatter(x, y.Select(v => double.IsFinite(v) ? v : double.NaN).ToArray());
        s.LegendText = legend;
        s.MarkerSize = x.Length <= 60 ? 4 : 0;
        return s;
    }

    private static Chart Save(Plot plot, string directory, string file, string title, string caption, int height = Height)
    {
        string path = Path.Combine(directory, file), tmp = path + ".tmp.png";
        plot.SavePng(tmp, Width, height);
        File.Move(tmp, path, overwrite: true);
        return new Chart(file, title, caption);
    }
}
