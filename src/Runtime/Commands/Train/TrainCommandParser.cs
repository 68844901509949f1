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
        d.Command.SetAction(parse => TrainCommand.Execute(new TrainCommand.Request(
            d.Options.Apply(recipe, parse), parse.GetValue(d.Device)!, parse.GetValue(d.Metrics), parse.GetValue(d.LogEvery), parse.GetValue(d.Simulate), d.Wiring), Console.Out));
        return d.Command;
    }
}
