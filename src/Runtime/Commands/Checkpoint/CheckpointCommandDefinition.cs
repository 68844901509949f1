using System.CommandLine;

namespace Moe.Runtime.Commands.Checkpoint;

/// <summary>Options of <c>moe checkpoint</c>: <c>inspect DIR</c> and <c>export DIR --hf OUT</c>.</summary>
public sealed class CheckpointCommandDefinition
{
    public const string Name = "checkpoint";

    public CheckpointCommandDefinition()
    {
        Command = new Command(Name, "Inspect a Moe checkpoint (layout, step, sizes, integrity) or export its weights as a Hugging Face folder.");
        InspectFolder = new Argument<string>("DIR") { Description = "A save folder (its latest checkpoint) or an iter_NNNNNNN folder." };
        Inspect = new Command("inspect", "Print a checkpoint's layout, step, sizes and integrity (every rank file present and of the size metadata.json records, " +
            "every weight and optimizer state covered exactly once); exits 2 when something is wrong.") { InspectFolder };
        ExportFolder = new Argument<string>("DIR") { Description = "A save folder (its latest checkpoint) or an iter_NNNNNNN folder." };
        HuggingFace = new Option<string>("--hf") { Description = "The Hugging Face folder to write (new or empty): config.json and hub-named safetensors.", Required = true };
        Export = new Command("export", "Write a checkpoint's weights as a Hugging Face model folder that transformers and `train --load` read.") { ExportFolder, HuggingFace };
        Command.Subcommands.Add(Inspect);
        Command.Subcommands.Add(Export);
    }

    public Command Command { get; }
    public Command Inspect { get; }
    public Argument<string> InspectFolder { get; }
    public Command Export { get; }
    public Argument<string> ExportFolder { get; }
    public Option<string> HuggingFace { get; }
}
