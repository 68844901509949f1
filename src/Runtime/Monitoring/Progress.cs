using System.Globalization;
using System.Text;
using Moe.Runtime.Training;
using Spectre.Console;

namespace Moe.Runtime.Monitoring;

/// <summary>A plain progress line every <paramref name="every"/> steps and at the last step: for a log file or a pipe.</summary>
public sealed class ProgressLines(TextWriter output, int every, int totalSteps) : ITrainingObserver
{
    public StepMetrics StepEnded(StepMetrics m)
    {
        if (m.Step % Math.Max(1, every) == 0 || m.Step == totalSteps || m.ValLoss is not null || m.StopReason is not null)
            output.WriteLine(m.ToProgressLine(totalSteps));
        return m;
    }
}

/// <summary>
/// A terminal's progress bar (Spectre.Console): steps done, elapsed time, time remaining, and in the description
/// the current loss, the last validation loss and tokens/s.
/// </summary>
public sealed class ProgressBar(ProgressTask task) : ITrainingObserver
{
    private double? _val;

    public StepMetrics StepEnded(StepMetrics m)
    {
        _val = m.ValLoss ?? _val;
        task.Value = m.Step;
        task.Description = Markup.Escape(string.Create(CultureInfo.InvariantCulture,
            $"loss {m.LmLoss:F3}{(_val is double v ? $"  val {v:F3}" : "")}  {m.TokensPerSecond:F0} tok/s"));
        return m;
    }

    /// <summary>
    /// Runs <paramref name="train"/> under a progress bar on stderr. Lines written to the returned writer while the bar
    /// is shown go through Spectre's console, which prints them above the bar instead of through it.
    /// </summary>
    public static T Show<T>(int totalSteps, Func<ProgressBar, TextWriter, T> train)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) });
        return console.Progress()
            .AutoClear(false)
            .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(),
                new ElapsedTimeColumn(), new RemainingTimeColumn(), new SpinnerColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask("starting", maxValue: totalSteps);
                return train(new ProgressBar(task), new ConsoleLines(console));
            });
    }

    /// <summary>A TextWriter that hands whole lines to a Spectre console (as plain text, not markup).</summary>
    private sealed class ConsoleLines(IAnsiConsole console) : TextWriter
    {
        private readonly StringBuilder _line = new();

        public override Encoding Encoding => Encoding.UTF8;

        public override void Write(char value)
        {
            if (value == '\n')
            {
                console.WriteLine(_line.ToString().TrimEnd('\r'));
                _line.Clear();
            }
            else _line.Append(value);
        }
    }
}

/// <summary>Writes every line to two writers (the console and the run's log file).</summary>
public sealed class TeeWriter(TextWriter first, TextWriter second) : TextWriter
{
    public override Encoding Encoding => first.Encoding;

    public override void Write(char value)
    {
        first.Write(value);
        second.Write(value);
    }

    public override void Write(string? value)
    {
        first.Write(value);
        second.Write(value);
    }

    public override void WriteLine(string? value)
    {
        first.WriteLine(value);
        second.WriteLine(value);
    }

    public override void Flush()
    {
        first.Flush();
        second.Flush();
    }
}
