using System.CommandLine;
using Moe.Dsl;
using Moe.Dsl.Planning;

namespace Moe.Runtime.Commands.Plan;

/// <summary>Options of <c>moe plan</c>.</summary>
public sealed class PlanCommandDefinition
{
    public const string Name = "plan";

    /// <summary>Model presets the <c>moe</c> tool accepts with --model (recipe projects carry their own model).</summary>
    public static IReadOnlyDictionary<string, Model> Presets { get; } = new Dictionary<string, Model>(StringComparer.Ordinal)
    {
        ["8x7b"] = Model.Mixtral8x7B,
        ["8x7b-instruct"] = Model.Mixtral8x7BInstruct,
        ["8x22b"] = Model.Mixtral8x22B,
        ["8x22b-instruct"] = Model.Mixtral8x22BInstruct,
        ["tiny"] = Model.TinyMixtral,
    };

    public PlanCommandDefinition(RecipeSettings? recipe)
    {
        Recipe = recipe;
        Command = new Command(Name, "Validate a recipe and print its plan: derived data parallel sizes, process groups, " +
            "pipeline stages, expert placement, and per-GPU memory against the GPU's HBM.");
        Options = new RecipeOptions(recipe ?? new RecipeSettings { Name = Model.Mixtral8x7B.Name, Model = Model.Mixtral8x7B });
        Options.AddTo(Command);
        if (recipe is null)
        {
            ModelOption = new Option<string>("--model")
            {
                Description = "Model preset: " + string.Join(", ", Presets.Keys) + ".",
                DefaultValueFactory = _ => "8x7b",
            };
            ModelOption.AcceptOnlyFromAmong([.. Presets.Keys]);
            Command.Options.Add(ModelOption);
        }
        string defaultGpu = GpuSpec.Of(recipe?.Parallelism.Gpu ?? Dsl.Gpu.H100).Name.ToLowerInvariant();
        Gpu = new Option<string>("--gpu")
        {
            Description = "GPU to check memory against (default: the recipe's Parallelism.Gpu): " +
                string.Join(", ", GpuSpec.All.Select(g => g.Name.ToLowerInvariant())) + ".",
            DefaultValueFactory = _ => defaultGpu,
        };
        Gpu.AcceptOnlyFromAmong([.. GpuSpec.All.Select(g => g.Name.ToLowerInvariant())]);
        Command.Options.Add(Gpu);
    }

    public RecipeSettings? Recipe { get; }

    public Command Command { get; }

    public RecipeOptions Options { get; }

    public Option<string>? ModelOption { get; }

    public Option<string> Gpu { get; }
}
