using System.CommandLine;

namespace Moe.Runtime.Commands.Checkpoint;

/// <summary>Binds <c>moe checkpoint inspect|export</c> to <see cref="CheckpointCommand"/>.</summary>
public static class CheckpointCommandParser
{
    public static Command Create()
    {
        var d = new CheckpointCommandDefinition();
        d.Inspect.SetAction(parse => CheckpointCommand.Inspect(parse.GetValue(d.InspectFolder)!, Console.Out));
        d.Export.SetAction(parse => CheckpointCommand.Export(parse.GetValue(d.ExportFolder)!, parse.GetValue(d.HuggingFace)!, Console.Out));
        return d.Command;
    }
}
