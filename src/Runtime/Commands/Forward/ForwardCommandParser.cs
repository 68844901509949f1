using System.CommandLine;

namespace Moe.Runtime.Commands.Forward;

/// <summary>Binds <c>moe forward</c>'s options to <see cref="ForwardCommand"/>.</summary>
public static class ForwardCommandParser
{
    public static Command Create()
    {
        var d = new ForwardCommandDefinition();
        d.Command.SetAction(parse => ForwardCommand.Execute(new ForwardCommand.Request(
            parse.GetValue(d.Checkpoint)!, parse.GetValue(d.Input)!, parse.GetValue(d.Output)!,
            parse.GetValue(d.Grads), parse.GetValue(d.Device)!, parse.GetValue(d.Dtype)!), Console.Out));
        return d.Command;
    }
}
