using System.CommandLine;
using Moe.Dsl;

namespace Moe.Runtime.Commands.Layout;

/// <summary>Binds <c>moe layout</c>'s options to <see cref="LayoutCommand"/>.</summary>
public static class LayoutCommandParser
{
    public static Command Create()
    {
        var d = new LayoutCommandDefinition();
        d.Command.SetAction(parse =>
        {
            var parallelism = new Parallelism
            {
                Gpus = parse.GetValue(d.Gpus),
                Tensor = parse.GetValue(d.Tensor),
                Pipeline = parse.GetValue(d.Pipeline),
                Context = parse.GetValue(d.Context),
                Expert = parse.GetValue(d.Expert),
                ExpertTensor = parse.GetValue(d.ExpertTensor),
                Order = RecipeOptions.ParseOrder(parse.GetValue(d.Order)!),
            };
            return LayoutCommand.Execute(parallelism, parse.GetValue(d.Json), Console.Out);
        });
        return d.Command;
    }
}
