using Moe.Runtime.Checkpoints;
using Moe.Runtime.Devices;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Commands.Forward;

/// <summary>
/// Runs a Hugging Face checkpoint with transformers' semantics and writes what transformers would:
/// logits [B, S, V] (eval mode), lm_loss / aux_loss / loss ([1] each), router_logits.L ([B·S, E]), and with
/// --grads the gradient of loss = lm_loss + router_aux_loss_coef · aux_loss (train mode) as grad.&lt;hub key&gt;.
/// </summary>
public static class ForwardCommand
{
    public sealed record Request(string Checkpoint, string Input, string Output, bool Grads, string Device, string Dtype);

    public static int Execute(Request r, TextWriter log)
    {
        var device = ComputeDevice.Resolve(r.Device);
        var dtype = ComputeDevice.ResolveDtype(r.Dtype);
        var config = MixtralStateDictAdapter.ReadConfig(r.Checkpoint);
        using var model = new MixtralModel(config, new MoeOptions { TopK = config.TopK }, dtype, device);
        MixtralStateDictAdapter.Load(model, r.Checkpoint);
        Tensor ids;
        using (var input = SafetensorsFile.Open(r.Input))
        {
            var entry = input.Entry("input_ids");
            if (entry.Dtype != "I64" || entry.Shape.Length != 2)
                throw new UserError($"{r.Input}: input_ids must be int64 [B, S]; it is {entry.Dtype} [{string.Join(", ", entry.Shape)}].");
            ids = input.Read("input_ids").to(device);
        }
        long maxId = ids.max().item<long>(), minId = ids.min().item<long>();
        if (minId < 0 || maxId >= config.VocabSize)
            throw new UserError($"{r.Input}: input_ids range over [{minId}, {maxId}] but the vocabulary has {config.VocabSize} ids.");
        var (labels, mask) = MixtralModel.ShiftedLabels(ids);
        var outputs = new List<KeyValuePair<string, Tensor>>();
        using (torch.no_grad())
        {
            model.eval();
            var o = model.Forward(ids, labels, mask);
            var loss = o.LmLoss! + config.RouterAuxLossCoef * o.AuxLoss;
            outputs.Add(new("logits", o.LogitsBSV!.to(ScalarType.Float32)));
            outputs.Add(new("loss", loss.reshape(1)));
            outputs.Add(new("lm_loss", o.LmLoss!.reshape(1)));
            outputs.Add(new("aux_loss", o.AuxLoss.reshape(1)));
            for (int l = 0; l < o.Layers.Count; l++)
                outputs.Add(new($"router_logits.{l}", o.Layers[l].Routing.LogitsTE.to(ScalarType.Float32)));
            log.WriteLine($"loss {loss.item<float>():G7}  lm_loss {o.LmLoss!.item<float>():G7}  aux_loss {o.AuxLoss.item<float>():G7}");
        }
        if (r.Grads)
        {
            model.train();
            var o = model.Forward(ids, labels, mask, returnLogits: false);
            (o.LmLoss! + config.RouterAuxLossCoef * o.AuxLoss).backward();
            ManagedBackward.Complete();
            foreach (var (key, grad) in MixtralStateDictAdapter.Named(model, gradients: true))
                outputs.Add(new("grad." + key, grad.to(ScalarType.Float32)));
        }
        SafetensorsFile.Write(r.Output, outputs);
        log.WriteLine($"wrote {outputs.Count} tensors to {r.Output}");
        return 0;
    }
}
