using System.CommandLine;

namespace Moe.Runtime.Commands.Report;

/// <summary>Binds <c>moe report</c>'s options to <see cref="ReportCommand"/>.</summary>
public static class ReportCommandParser
{
    public static Command Create()
    {
        var d = new ReportCommandDefinition();
        d.Command.SetAction(parse => ReportCommand.Execute(parse.GetValue(d.RunDir)!, parse.GetValue(d.Output), Console.Out));
        return d.Command;
    }
}
