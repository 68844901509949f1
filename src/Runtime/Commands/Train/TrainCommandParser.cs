using System.CommandLine;
using Moe.Dsl;
using Moe.Dsl.Layout;

namespace Moe.Runtime.Commands.Train;

/// <summary>Binds the <c>train</c> verb to <see cref="TrainCommand"/>.</summary>
public static class TrainCommandParser
{
    public static Command Create(RecipeSettings recipe, IRankLayout? wiring = null)
    {
        var d = new TrainCommandDefinition(recipe, wiring);
        d.Command.SetAction(parse => TrainCommand.Execute(d.Options.Apply(recipe, parse), new TrainCommand.Request(
            parse.GetValue(d.Device)!, parse.GetValue(d.RunDir), parse.GetValue(d.Metrics), parse.GetValue(d.AppendMetrics),
            parse.GetValue(d.TensorBoard), parse.GetValue(d.LogEvery), parse.GetValue(d.Simulate), d.Wiring, parse.GetValue(d.AllowChanged) ?? []), Console.Out));
        return d.Command;
    }
}
