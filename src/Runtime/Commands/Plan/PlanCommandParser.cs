using System.CommandLine;
using Moe.Dsl;
using Moe.Dsl.Planning;

namespace Moe.Runtime.Commands.Plan;

/// <summary>Binds <c>moe plan</c>'s options to <see cref="PlanCommand"/>.</summary>
public static class PlanCommandParser
{
    public static Command Create(RecipeSettings? recipe)
    {
        var definition = new PlanCommandDefinition(recipe);
        definition.Command.SetAction(parse => Run(definition, parse));
        return definition.Command;
    }

    /// <summary>Runs the plan for a parse result of a command that carries <paramref name="definition"/>'s options.</summary>
    public static int Run(PlanCommandDefinition definition, ParseResult parse)
    {
        var preset = definition.Recipe is null ? PlanCommandDefinition.Presets[parse.GetValue(definition.ModelOption!)!] : null;
        var baseSettings = definition.Recipe ?? new RecipeSettings { Name = preset!.Name, Model = preset };
        var settings = definition.Options.Apply(baseSettings, parse);
        var gpu = GpuSpec.Find(parse.GetValue(definition.Gpu)!)!;
        settings = settings with { Parallelism = settings.Parallelism with { Gpu = gpu.Member } };
        return PlanCommand.Execute(settings, Console.Out);
    }
}
