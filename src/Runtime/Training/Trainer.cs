using System.Diagnostics;
using Moe.Dsl;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Commands;
using Moe.Runtime.Data;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.Training;

/// <summary>Where samples come from: index i of the run's sample stream.</summary>
public interface ISampleSource
{
    GptSample Sample(long index);
}

/// <summary>How a run ended: its steps, and why it stopped early (a health signal in Health.StopOn), if it did.</summary>
public sealed record TrainResult(IReadOnlyList<StepMetrics> Steps, string? StopReason = null);

/// <summary>
/// One-process trainer: AdamW with decoupled weight decay (none on norm weights, as Megatron exempts
/// 1-D parameters), warm-up then cosine/linear decay, global-norm clipping, gradient accumulation over
/// GlobalBatchSize / (MicroBatchSize · DP) micro-batches, seeded. fp32 on CPU; with bf16 the model computes
/// in bf16 while fp32 master weights and AdamW state live beside it (TorchSharp has no autocast).
/// A NaN or infinite loss stops the run before the optimizer step, naming the last good step.
/// </summary>
public sealed class Trainer : IDisposable
{
    private readonly RecipeSettings _s;
    private readonly Device _device;
    private readonly MixtralModel _model;
    private readonly Parameter[] _params;
    private readonly Parameter[] _master;
    private readonly optim.Optimizer _optimizer;
    private readonly bool _mixed;

    public Trainer(RecipeSettings settings, Device device, TextWriter log)
    {
        _s = settings;
        _device = device;
        var dtype = settings.Training.Precision == Precision.Bf16 && device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;
        if (settings.Training.Precision == Precision.Bf16 && dtype == ScalarType.Float32)
            log.WriteLine("note: bf16 on the CPU is emulated and slow; training in fp32.");
        _mixed = dtype == ScalarType.BFloat16;
        torch.manual_seed(settings.Training.Seed);
        var options = MoeOptions.From(settings);
        if (settings.Checkpoint.Load is string load)
        {
            var config = MixtralStateDictAdapter.ReadConfig(load);
            CheckMatches(config, MixtralConfig.From(settings.Model), load);
            _model = new MixtralModel(config, options, dtype, device);
            MixtralStateDictAdapter.Load(_model, load);
            log.WriteLine($"loaded {load}");
        }
        else
        {
            _model = new MixtralModel(MixtralConfig.From(settings.Model), options, dtype, device);
            _model.InitializeWeights(settings.Training.Seed);
        }
        _model.train();
        _params = _model.parameters().ToArray();
        _master = _mixed
            ? _params.Select(p => new Parameter(p.detach().to(ScalarType.Float32).clone())).ToArray()
            : _params;
        var t = settings.Training;
        var decay = _master.Where(Decays).ToArray();
        var noDecay = _master.Where(p => !Decays(p)).ToArray();
        _optimizer = torch.optim.AdamW(new[]
        {
            new AdamW.ParamGroup(decay, new AdamW.Options { LearningRate = t.LearningRate, weight_decay = t.WeightDecay, beta1 = t.AdamBeta1, beta2 = t.AdamBeta2, eps = t.AdamEps }),
            new AdamW.ParamGroup(noDecay, new AdamW.Options { LearningRate = t.LearningRate, weight_decay = 0, beta1 = t.AdamBeta1, beta2 = t.AdamBeta2, eps = t.AdamEps }),
        }, t.LearningRate, t.AdamBeta1, t.AdamBeta2, t.AdamEps, t.WeightDecay);
    }

    public MixtralModel Model => _model;

    /// <summary>
    /// Whether weight decay applies to a parameter. Megatron's convention (get_param_groups): matrices
    /// (linear, expert, router and embedding weights) decay; 1-D parameters — norm weights and biases — do not.
    /// Mixtral has no biases, so in practice the RMSNorm weights are the exempt ones.
    /// </summary>
    public static bool Decays(Parameter p) => p.dim() >= 2;

    public TrainResult Run(ISampleSource data, ITrainingObserver observer, Action<int>? afterStep = null)
    {
        var t = _s.Training;
        int microBatches = Math.Max(1, _s.GradientAccumulationSteps);
        int b = t.MicroBatchSize, seq = _s.Data.SequenceLength;
        double auxCoeff = _s.Router.LoadBalancing == LoadBalancing.None ? 0 : _s.AuxLossCoeff;
        double zCoeff = _s.Router.ZLossCoeff ?? 0;
        var history = new List<StepMetrics>();
        observer.RunStarted();                                                      // issue 15 seam
        for (int step = 1; step <= t.Steps; step++)
        {
            var watch = Stopwatch.StartNew();
            using var scope = torch.NewDisposeScope();
            double lr = LearningRate.At(step, t);
            foreach (var g in _optimizer.ParamGroups) g.LearningRate = lr;
            _optimizer.zero_grad();
            foreach (var p in _params) p.grad = null;
            double loss = 0, lm = 0, aux = 0, z = 0, routed = 0, kept = 0;
            long[][] perExpert = Enumerable.Range(0, _model.Config.Layers).Select(_ => new long[_model.Config.Experts]).ToArray();
            long[][] routedPerExpert = Enumerable.Range(0, _model.Config.Layers).Select(_ => new long[_model.Config.Experts]).ToArray();   // issue 15 seam
            for (int micro = 0; micro < microBatches; micro++)
            {
                // Each micro-batch's handles go when it is done, so accumulation holds one micro-batch's activations.
                using var microScope = torch.NewDisposeScope();
                long first = ((long)(step - 1) * microBatches + micro) * b;
                var batch = Enumerable.Range(0, b).Select(i => data.Sample(first + i)).ToArray();
                Tensor Stack(Func<GptSample, long[]> f) => torch.tensor(batch.SelectMany(f).ToArray(), device: _device).view(b, seq);
                var lossMask = torch.tensor(batch.SelectMany(x => x.LossMask).ToArray(), device: _device).view(b, seq);
                var o = _model.Forward(Stack(x => x.Tokens), Stack(x => x.Labels), lossMask, Stack(x => x.PositionIds),
                    _s.Data.ResetAttentionMask ? Stack(x => x.DocumentIds) : null, returnLogits: false);
                var total = o.LmLoss! + auxCoeff * o.AuxLoss + (o.ZLoss is null ? 0 : zCoeff * o.ZLoss);
                (total / microBatches).backward();
                ManagedBackward.Complete();
                loss += total.item<float>() / microBatches;
                lm += o.LmLoss!.item<float>() / microBatches;
                aux += o.AuxLoss.item<float>() / microBatches;
                z += (o.ZLoss?.item<float>() ?? 0) / microBatches;
                for (int l = 0; l < o.Layers.Count; l++)
                {
                    var d = o.Layers[l].Dispatch;
                    var rows = d.KeptPerExpertE.cpu().data<long>().ToArray();   // tokens, not padding rows
                    for (int e = 0; e < rows.Length; e++) perExpert[l][e] += rows[e];
                    var chosen = d.RoutedPerExpertE.cpu().data<long>().ToArray();   // issue 15 seam: load balance is measured before drops
                    for (int e = 0; e < chosen.Length; e++) routedPerExpert[l][e] += chosen[e];
                    routed += d.RoutedPerExpertE.sum().item<long>();
                    kept += d.KeptPerExpertE.sum().item<long>();
                }
            }
            if (!double.IsFinite(loss))
            {
                string last = history.Count == 0 ? "no step completed" : $"the last good step was {history[^1].Step} (loss {history[^1].Loss:G5})";
                throw new UserError($"The loss became {(double.IsNaN(loss) ? "NaN" : "infinite")} at step {step}; {last}. Training stopped before the optimizer step, " +
                    $"so the weights are those after step {step - 1}. Lower the learning rate (it was {lr:G3}) or check the data.");
            }
            if (_mixed)
                for (int i = 0; i < _params.Length; i++)
                    _master[i].grad = _params[i].grad?.to(ScalarType.Float32);
            double gradNorm = ClipGradients(_master, t.ClipGrad);
            if (!double.IsFinite(gradNorm))
            {
                string last = history.Count == 0 ? "no step completed" : $"the last good step was {history[^1].Step} (loss {history[^1].Loss:G5})";
                throw new UserError($"The gradient norm became {(double.IsNaN(gradNorm) ? "NaN" : "infinite")} at step {step} (the loss was {loss:G5}); {last}. Training stopped before the optimizer step, " +
                    $"so the weights are those after step {step - 1}. Lower the learning rate (it was {lr:G3}) or check the data.");
            }
            _optimizer.step();
            _model.ResetGlobalAuxLoss();   // global_aux_loss counts span one global batch (Megatron resets per iteration)
            if (_mixed)
                using (torch.no_grad())
                    for (int i = 0; i < _params.Length; i++) _params[i].copy_(_master[i]);
            if (_device.type == DeviceType.CUDA) torch.cuda.synchronize();
            double seconds = watch.Elapsed.TotalSeconds;
            var m = new StepMetrics(step, loss, lm, aux, z, lr, gradNorm, perExpert, routed > 0 ? 1 - kept / routed : 0, microBatches * b * (double)seq / seconds)
                { RoutedPerExpert = routedPerExpert, StepSeconds = seconds };
            m = observer.StepEnded(m);                                              // issue 15 seam: memory, MFU, validation, health, metrics, TensorBoard, progress
            history.Add(m);
            afterStep?.Invoke(step);
            if (m.StopReason is not null) break;                                    // issue 15 seam: a signal in Health.StopOn
        }
        var result = new TrainResult(history, history.Count > 0 ? history[^1].StopReason : null);
        observer.RunEnded(result);                                                  // issue 15 seam
        return result;
    }

    /// <summary>
    /// Global-norm clipping (Megatron's --clip-grad): when the L2 norm of all gradients together exceeds
    /// <paramref name="maxNorm"/>, every gradient is scaled by maxNorm / norm; 0 turns clipping off.
    /// Returns the norm before clipping (what the metrics report as grad_norm).
    /// </summary>
    public static double ClipGradients(IReadOnlyList<Parameter> parameters, double maxNorm) =>
        maxNorm > 0 ? torch.nn.utils.clip_grad_norm_(parameters, maxNorm) : GradNorm(parameters);

    /// <summary>‖all gradients‖₂ in fp32, read back once (not once per parameter: each read waits for the GPU).</summary>
    private static double GradNorm(IEnumerable<Parameter> ps)
    {
        using var scope = torch.NewDisposeScope();
        var norms = ps.Select(p => p.grad).Where(g => g is not null).Select(g => g!.to(ScalarType.Float32).norm()).ToArray();
        return norms.Length == 0 ? 0 : torch.stack(norms).norm().item<float>();
    }

    private static void CheckMatches(MixtralConfig checkpoint, MixtralConfig recipe, string path)
    {
        var a = (checkpoint.HiddenSize, checkpoint.Layers, checkpoint.Experts, checkpoint.Heads, checkpoint.KeyValueHeads, checkpoint.VocabSize, checkpoint.IntermediateSize);
        var b = (recipe.HiddenSize, recipe.Layers, recipe.Experts, recipe.Heads, recipe.KeyValueHeads, recipe.VocabSize, recipe.IntermediateSize);
        if (a != b)
            throw new UserError($"{path}/config.json (hidden, layers, experts, heads, kv heads, vocab, ffn) = {a} does not match the recipe's model {b}; choose the matching Model preset.");
    }

    public void Dispose()
    {
        _optimizer.Dispose();
        _model.Dispose();
    }
}

/// <summary>Samples of one split of a Megatron indexed dataset: training (0, the default) or validation (1).</summary>
public sealed class IndexedSampleSource : ISampleSource, IDisposable
{
    private readonly IndexedDataset _data;
    private readonly IndexedDataset? _lossMask;
    private readonly GptDataset _samples;

    /// <param name="s">The recipe (Data and Training).</param>
    /// <param name="eodId">End-of-document token id.</param>
    /// <param name="split">0 train, 1 validation, 2 test: the part of Data.Split to draw from.</param>
    /// <param name="samples">Samples the run draws (default: Steps × GlobalBatchSize).</param>
    public IndexedSampleSource(RecipeSettings s, int eodId, int split = 0, int? samples = null)   // issue 15: split, samples
    {
        string prefix = s.Data.Prefix ?? throw new UserError("Data.Prefix is not set: training needs a dataset (a Megatron .bin/.idx prefix).");
        _data = IndexedDataset.Open(prefix);
        string[] names = ["training", "validation", "test"];
        var range = DataSplits.Ranges(s.Data.Split, _data.SequenceCount)[split]
            ?? throw new UserError($"Data.Split \"{s.Data.Split}\" gives the {names[split]} split no weight.");
        if (range.End <= range.Start)
            throw new UserError($"Data.Split \"{s.Data.Split}\" gives the {names[split]} split no sequence of the {_data.SequenceCount} in {prefix}; give it a larger weight or use more data.");
        samples ??= checked(s.Training.Steps * s.Training.GlobalBatchSize);
        if (s.Data.Format == DataFormat.Sft)
        {
            if (!prefix.EndsWith("_text_document", StringComparison.Ordinal))
                throw new UserError($"Data.Prefix \"{prefix}\": SFT data is written by `moe preprocess --sft` as <prefix>_text_document with <prefix>_lossmask_document beside it.");
            _lossMask = IndexedDataset.Open(prefix[..^"_text_document".Length] + "_lossmask_document");
        }
        _samples = new GptDataset(_data, range, samples.Value, SampleOptions.From(s.Data, eodId), s.Training.Seed, _lossMask);
    }

    public GptSample Sample(long index) => _samples.Sample(index);

    public void Dispose()
    {
        _data.Dispose();
        _lossMask?.Dispose();
    }
}
