using System.CommandLine;
using Moe.Dsl;

namespace Moe.Runtime.Commands.Train;

/// <summary>Options of a recipe's <c>train</c> verb: the recipe overrides plus the run's own switches.</summary>
public sealed class TrainCommandDefinition
{
    public const string Name = "train";

    public TrainCommandDefinition(RecipeSettings recipe)
    {
        Recipe = recipe;
        Command = new Command(Name, "Train the recipe (validated by the rule set first): on the CPU or one GPU, or with --simulate its whole topology on the CPU.");
        Options = new RecipeOptions(recipe);
        Options.AddTo(Command);
        Metrics = new Option<string?>("--metrics") { Description = "Append one JSON line per step to this file (step, losses, lr, grad_norm, tokens_per_expert, drop_rate, tokens_per_s)." };
        Device = new Option<string>("--device") { Description = "cpu or cuda.", DefaultValueFactory = _ => "cpu" };
        Device.AcceptOnlyFromAmong("cpu", "cuda");
        LogEvery = new Option<int>("--log-every") { Description = "When stderr is not a terminal, print a progress line every this many steps.", DefaultValueFactory = _ => 10 };
        Simulate = new Option<bool>("--simulate") { Description = "Run the recipe's exact topology on the CPU, one thread per rank (in-process collectives); a model too large for that is shrunk within its family, and the run says so." };
        AllowChanged = new Option<string[]>("--allow-changed")
        {
            Description = "Settings a --load checkpoint may differ in, comma-separated (e.g. seed,Capacity.Factor): without it a change of the training dynamics is an error naming each field.",
            AllowMultipleArgumentsPerToken = false,
        };
        foreach (var o in new Option[] { Metrics, Device, LogEvery, Simulate, AllowChanged }) Command.Options.Add(o);
    }

    public RecipeSettings Recipe { get; }
    public Command Command { get; }
    public RecipeOptions Options { get; }
    public Option<string?> Metrics { get; }
    public Option<string> Device { get; }
    public Option<int> LogEvery { get; }
    public Option<bool> Simulate { get; }
    public Option<string[]> AllowChanged { get; }
}
