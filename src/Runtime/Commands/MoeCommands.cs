using System.CommandLine;
using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Commands.Bench;
using Moe.Runtime.Commands.Checkpoint;
using Moe.Runtime.Commands.Forward;
using Moe.Runtime.Commands.Layout;
using Moe.Runtime.Commands.Plan;
using Moe.Runtime.Commands.Preprocess;
using Moe.Runtime.Commands.Report;
using Moe.Runtime.Commands.Train;

namespace Moe.Runtime.Commands;

/// <summary>
/// Builds the <c>moe</c> command tree. The <c>moe</c> tool and every recipe's generated entry point
/// host the same verbs; each verb lives in Commands/&lt;Verb&gt;/ as three files
/// (&lt;Verb&gt;CommandDefinition: options; &lt;Verb&gt;CommandParser: SetAction; &lt;Verb&gt;Command: behaviour).
/// </summary>
public static class MoeCommands
{
    /// <summary>Exit code for input the user must fix.</summary>
    public const int UserErrorExitCode = 2;

    /// <summary>Exit code when ranks of a job failed or a collective's deadline passed.</summary>
    public const int JobFailedExitCode = 3;

    /// <summary>The <c>moe</c> tool: verbs that take a model preset or files on the command line.</summary>
    public static RootCommand CreateRoot() => CreateRoot(null);

    /// <summary>
    /// A recipe project's entry point: the same verbs bound to <paramref name="recipe"/>, whose settings are
    /// the defaults of the override options. With no verb it prints the recipe's plan. <paramref name="wiring"/>
    /// is the recipe's generated <c>Wiring.Layout</c>; the train verb carries it (<see cref="TrainCommandDefinition.Wiring"/>)
    /// for <see cref="Dsl.Layout.LayoutSource.For"/>, which uses it unless the command line changes the topology.
    /// </summary>
    public static RootCommand CreateRoot(RecipeSettings? recipe, IRankLayout? wiring = null)
    {
        var root = new RootCommand(recipe is null
            ? "Moe: plan, check and run Mixture-of-Experts fine-tuning recipes (Megatron-Core semantics)."
            : $"{recipe.Name}: a Moe recipe for {recipe.Model.Name}. With no verb, prints the plan.");
        foreach (var verb in Verbs(recipe, wiring)) root.Subcommands.Add(verb);
        if (recipe is not null)
        {
            var plan = new PlanCommandDefinition(recipe);
            foreach (var option in plan.Command.Options) root.Options.Add(option);
            root.SetAction(parse => PlanCommandParser.Run(plan, parse));
        }
        return root;
    }

    private static IEnumerable<Command> Verbs(RecipeSettings? recipe, IRankLayout? wiring)
    {
        yield return PlanCommandParser.Create(recipe);
        if (recipe is not null) yield return TrainCommandParser.Create(recipe, wiring);
        yield return CheckpointCommandParser.Create();
        if (recipe is null)
        {
            yield return LayoutCommandParser.Create();
            yield return ForwardCommandParser.Create();
            yield return BenchCommandParser.Create();
            yield return PreprocessCommandParser.Create();
            yield return ReportCommandParser.Create();
        }
    }

    /// <summary>
    /// Parses and runs, turning <see cref="UserError"/> into a message and exit code 2. A command line that does
    /// not parse prints each error and one hint line (not the whole help) and also exits with 2.
    /// </summary>
    public static int Run(RootCommand root, string[] args)
    {
        var parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            foreach (var error in parse.Errors) Console.Error.WriteLine($"error: {error.Message}");
            Console.Error.WriteLine($"Run '{CommandPath(parse.CommandResult)} --help' for the options.");
            return UserErrorExitCode;
        }
        try
        {
            return parse.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (UserError e)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return UserErrorExitCode;
        }
        catch (Exception e) when (e is Distributed.InProcess.DistributedJobException or Distributed.CollectiveTimeoutException)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return JobFailedExitCode;
        }
    }

    /// <summary>"moe plan": the names of the commands from the root to the one that was parsed.</summary>
    private static string CommandPath(System.CommandLine.Parsing.CommandResult command)
    {
        var names = new List<string>();
        for (var result = command; result is not null; result = result.Parent as System.CommandLine.Parsing.CommandResult)
            names.Insert(0, result.Command.Name);
        return string.Join(" ", names);
    }
}
