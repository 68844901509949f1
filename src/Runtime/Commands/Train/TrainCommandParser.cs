using System.CommandLine;
using Moe.Dsl;

namespace Moe.Runtime.Commands.Train;

/// <summary>Binds the <c>train</c> verb to <see cref="TrainCommand"/>.</summary>
public static class TrainCommandParser
{
    public static Command Create(RecipeSettings recipe)
    {
        var d = new TrainCommandDefinition(recipe);
        d.Command.SetAction(parse => TrainCommand.Execute(new TrainCommand.Request(
            d.Options.Apply(recipe, parse), parse.GetValue(d.Device)!, parse.GetValue(d.Metrics), parse.GetValue(d.LogEvery), parse.GetValue(d.Simulate),
            parse.GetValue(d.AllowChanged) ?? []), Console.Out));
        return d.Command;
    }
}
