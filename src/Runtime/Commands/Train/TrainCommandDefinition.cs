using System.CommandLine;
using Moe.Dsl;
using Moe.Dsl.Layout;

namespace Moe.Runtime.Commands.Train;

/// <summary>Options of a recipe's <c>train</c> verb: the recipe overrides plus the run's own switches.</summary>
public sealed class TrainCommandDefinition
{
    public const string Name = "train";

    public TrainCommandDefinition(RecipeSettings recipe, IRankLayout? wiring = null)
    {
        Recipe = recipe;
        Wiring = wiring;
        Command = new Command(Name, "Train the recipe (validated by the rule set first): on the CPU or one GPU, or with --simulate its whole topology on the CPU.");
        Options = new RecipeOptions(recipe);
        Options.AddTo(Command);
        RunDir = new Option<string?>("--run-dir") { Description = "Directory this run writes into (metrics, train.log, TensorBoard, recipe.json, environment.json). Default: runs/<recipe>-<UTC time> under the working directory." };
        Metrics = new Option<string?>("--metrics") { Description = "Write one JSON line per step to this file instead of <run-dir>/metrics.jsonl (step, losses, lr, grad_norm, tokens per expert, drop_rate, tokens_per_s, val_loss, warnings)." };
        AppendMetrics = new Option<bool>("--append-metrics") { Description = "Add this run's lines to a metrics file that already holds another run's (refused otherwise)." };
        TensorBoard = new Option<string?>("--tensorboard") { Description = "Directory for TensorBoard event files. Default: Health.TensorBoardDir (\"tensorboard\" inside the run directory). Megatron: --tensorboard-dir." };
        Device = new Option<string>("--device") { Description = "cpu or cuda.", DefaultValueFactory = _ => "cpu" };
        Device.AcceptOnlyFromAmong("cpu", "cuda");
        LogEvery = new Option<int>("--log-every") { Description = "Print a progress line every this many steps to train.log, and to the console when stderr is not a terminal (a terminal gets a progress bar).", DefaultValueFactory = _ => 10 };
        Simulate = new Option<bool>("--simulate") { Description = "Run the recipe's exact topology on the CPU, one thread per rank (in-process collectives); a model too large for that is shrunk within its family, and the run says so." };
        AllowChanged = new Option<string[]>("--allow-changed")
        {
            Description = "Settings a --load checkpoint may differ in, comma-separated (e.g. seed,Capacity.Factor): without it a change of the training dynamics is an error naming each field.",
            AllowMultipleArgumentsPerToken = false,
        };
        foreach (var o in new Option[] { RunDir, Metrics, AppendMetrics, TensorBoard, Device, LogEvery, Simulate, AllowChanged }) Command.Options.Add(o);
    }

    public RecipeSettings Recipe { get; }

    /// <summary>
    /// The recipe's generated wiring (<c>Wiring.Layout</c>), or null (a recipe whose layout is decided at run time).
    /// The run's layout is <c>LayoutSource.For(settings after overrides, Wiring)</c>: the wiring unless the command
    /// line changed the topology.
    /// </summary>
    public IRankLayout? Wiring { get; }

    public Command Command { get; }
    public RecipeOptions Options { get; }
    public Option<string?> RunDir { get; }
    public Option<string?> Metrics { get; }
    public Option<bool> AppendMetrics { get; }
    public Option<string?> TensorBoard { get; }
    public Option<string> Device { get; }
    public Option<int> LogEvery { get; }
    public Option<bool> Simulate { get; }
    public Option<string[]> AllowChanged { get; }
}
