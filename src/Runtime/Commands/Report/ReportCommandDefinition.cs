using System.CommandLine;

namespace Moe.Runtime.Commands.Report;

/// <summary>Options of <c>moe report</c>.</summary>
public sealed class ReportCommandDefinition
{
    public const string Name = "report";

    public ReportCommandDefinition()
    {
        Command = new Command(Name, "Write one self-contained HTML page and PNG charts of a training run: loss and validation loss, " +
            "learning rate, gradient norm, token-drop rate, throughput, a per-layer expert-load heat map, and the health warnings.");
        RunDir = new Argument<string>("RUN_DIR") { Description = "The run directory `train` wrote (it holds metrics.jsonl)." };
        Output = new Option<string?>("--out") { Description = "Directory for report.html and the PNGs. Default: RUN_DIR/report." };
        Command.Arguments.Add(RunDir);
        Command.Options.Add(Output);
    }

    public Command Command { get; }
    public Argument<string> RunDir { get; }
    public Option<string?> Output { get; }
}
