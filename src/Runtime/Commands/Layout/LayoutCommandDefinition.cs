using System.CommandLine;

namespace Moe.Runtime.Commands.Layout;

/// <summary>Options of <c>moe layout</c>.</summary>
public sealed class LayoutCommandDefinition
{
    public const string Name = "layout";

    public LayoutCommandDefinition()
    {
        Command = new Command(Name, "Print Megatron-Core's rank layout for a GPU count and parallel sizes: every process group, " +
            "each rank's coordinates and the order of communicator creation.");
        Gpus = Required("--gpus", "World size (number of GPUs).");
        Tensor = Size("--tp", "Tensor-parallel size.");
        Pipeline = Size("--pp", "Pipeline-parallel size.");
        Context = Size("--cp", "Context-parallel size.");
        Expert = Size("--ep", "Expert-parallel size.");
        ExpertTensor = new Option<int?>("--etp") { Description = "Expert tensor-parallel size (default: --tp)." };
        Order = RecipeOptions.OrderOption(Dsl.Layout.RankOrder.TpCpEpDpPp);
        Json = new Option<bool>("--json") { Description = "Print the layout as JSON in the schema of Megatron's rank vectors." };
        foreach (var o in new Option[] { Gpus, Tensor, Pipeline, Context, Expert, ExpertTensor, Order, Json }) Command.Options.Add(o);
    }

    public Command Command { get; }
    public Option<int> Gpus { get; }
    public Option<int> Tensor { get; }
    public Option<int> Pipeline { get; }
    public Option<int> Context { get; }
    public Option<int> Expert { get; }
    public Option<int?> ExpertTensor { get; }
    public Option<string> Order { get; }
    public Option<bool> Json { get; }

    private static Option<int> Required(string name, string description) => new(name) { Description = description, Required = true };

    private static Option<int> Size(string name, string description) => new(name) { Description = description, DefaultValueFactory = _ => 1 };
}
