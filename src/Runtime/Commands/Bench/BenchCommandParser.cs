using System.CommandLine;

namespace Moe.Runtime.Commands.Bench;

/// <summary>Binds <c>moe bench</c> to <see cref="BenchCommand"/>.</summary>
public static class BenchCommandParser
{
    public static Command Create()
    {
        var d = new BenchCommandDefinition();
        d.Command.SetAction(parse => BenchCommand.Execute(new BenchCommand.Request(
            parse.GetValue(d.Model)!, parse.GetValue(d.Layers), parse.GetValue(d.Seq), parse.GetValue(d.MicroBatch),
            parse.GetValue(d.Iters), parse.GetValue(d.Device)!, parse.GetValue(d.Gpus), parse.GetValue(d.Expert), parse.GetValue(d.MicroBatches),
            parse.GetValue(d.Dispatcher)!, parse.GetValue(d.MainGrads), parse.GetValue(d.Tensor), parse.GetValue(d.Context), parse.GetValue(d.Pipeline), d.Recompute.Parse(parse),
            parse.GetValue(d.Optimizer), parse.GetValue(d.AllocatorStats), parse.GetValue(d.OverlapGradReduce)), Console.Out, Console.Error));
        return d.Command;
    }
}
