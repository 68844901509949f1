using System.CommandLine;

namespace Moe.Runtime.Commands.Forward;

/// <summary>Options of <c>moe forward</c>.</summary>
public sealed class ForwardCommandDefinition
{
    public const string Name = "forward";

    public ForwardCommandDefinition()
    {
        Command = new Command(Name, "Run a Hugging Face Mixtral checkpoint on input ids and write logits, losses, router logits and, " +
            "with --grads, every parameter's gradient — to check a conversion against transformers.");
        Checkpoint = new Option<string>("--checkpoint") { Description = "Hugging Face model directory (config.json + model.safetensors or sharded model-*.safetensors).", Required = true };
        Input = new Option<string>("--input") { Description = "safetensors file with input_ids (int64 [B, S]).", Required = true };
        Output = new Option<string>("--output") { Description = "safetensors file to write.", Required = true };
        Grads = new Option<bool>("--grads") { Description = "Also write grad.<hub key> of loss = lm_loss + router_aux_loss_coef · aux_loss, in train mode." };
        Device = new Option<string>("--device") { Description = "cpu or cuda.", DefaultValueFactory = _ => "cpu" };
        Device.AcceptOnlyFromAmong("cpu", "cuda");
        Dtype = new Option<string>("--dtype") { Description = "float32 or bfloat16.", DefaultValueFactory = _ => "float32" };
        Dtype.AcceptOnlyFromAmong("float32", "bfloat16");
        foreach (var o in new Option[] { Checkpoint, Input, Output, Grads, Device, Dtype }) Command.Options.Add(o);
    }

    public Command Command { get; }
    public Option<string> Checkpoint { get; }
    public Option<string> Input { get; }
    public Option<string> Output { get; }
    public Option<bool> Grads { get; }
    public Option<string> Device { get; }
    public Option<string> Dtype { get; }
}
