using System.CommandLine;
using Moe.Dsl;

namespace Moe.Runtime.Commands.Train;

/// <summary>Binds the <c>train</c> verb to <see cref="TrainCommand"/>.</summary>
public static class TrainCommandParser
{
    public static Command Create(RecipeSettings recipe)
    {
        var d = new TrainCommandDefinition(recipe);
        d.Command.SetAction(parse => TrainCommand.Execute(d.Options.Apply(recipe, parse), new TrainCommand.Request(
            parse.GetValue(d.Device)!, parse.GetValue(d.RunDir), parse.GetValue(d.Metrics), parse.GetValue(d.AppendMetrics),
            parse.GetValue(d.TensorBoard), parse.GetValue(d.LogEvery)), Console.Out));
        return d.Command;
    }
}
