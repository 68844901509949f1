using Moe.Dsl;
using Moe.Runtime.Data;
using Moe.Runtime.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Training;

/// <summary>
/// Validation loss, as Megatron's <c>evaluate</c> computes it: <c>EvalIters</c> global batches of validation
/// samples in micro-batches of <c>MicroBatchSize</c>, the model in eval mode, no gradients, and the LM loss
/// averaged over every counted token (a token-weighted mean, not a mean of micro-batch means). Unlike
/// Megatron, whose validation iterator walks on through the split, every evaluation uses the same first
/// samples of the validation split, so successive values compare like with like. With data parallelism each
/// rank evaluates every DP-th micro-batch and the sums are reduced; every rank runs its forwards, since they
/// hold collectives.
/// </summary>
public sealed class Evaluator(MixtralModel model, ISampleSource validation, RecipeSettings settings, RankContext rank)
{
    /// <summary>Samples one evaluation draws: EvalIters × GlobalBatchSize.</summary>
    public static int SampleCount(RecipeSettings s) => checked(s.Training.EvalIters * s.Training.GlobalBatchSize);

    /// <summary>The validation loss of the model as it is now; leaves the model in training mode.</summary>
    /// <remarks>
    /// Under context parallelism each rank of a cp group runs the same samples on its chunks (<see cref="MicroBatch"/>)
    /// and the sums are reduced over data × context parallel, so the mean is over every counted token of the sequences.
    /// </remarks>
    public double Loss()
    {
        int b = settings.Training.MicroBatchSize, seq = settings.Data.SequenceLength;
        int samples = SampleCount(settings);
        var device = rank.Device;
        var dp = rank.Groups.Dp;
        var context = model.Context ?? new ContextParallel(rank.Groups.Cp);
        double weighted = 0, tokens = 0;
        model.eval();
        try
        {
            using var noGrad = torch.no_grad();
            if (model.Stage.Stages > 1) (weighted, tokens) = PipelineSums(samples, b, seq, context);
            else for (int first = dp.Rank * b; first < samples; first += b * dp.Size)
            {
                using var scope = torch.NewDisposeScope();
                int n = Math.Min(b, samples - first);
                var batch = Enumerable.Range(first, n).Select(i => validation.Sample(i)).ToArray();
                var mb = MicroBatch.From(batch, seq, device, context, settings.Data.ResetAttentionMask);
                var o = model.Forward(mb.TokensBS, mb.LabelsBS, mb.LossMaskBS, mb.PositionIdsBS, mb.DocumentIdsBS, returnLogits: false);
                // A rank whose positions are all masked has cross-entropy's mean NaN: it weighs nothing.
                if (mb.LocalCounted == 0) continue;
                weighted += o.LmLoss!.item<float>() * (double)mb.LocalCounted;
                tokens += mb.LocalCounted;
            }
        }
        finally
        {
            model.train();
        }
        var group = rank.Groups.DpCp;
        if (group.Size > 1)
        {
            using var sums = torch.tensor(new[] { weighted, tokens }, device: group.DeviceForScalars);
            group.AllReduce(sums);
            var v = sums.cpu().data<double>().ToArray();
            (weighted, tokens) = (v[0], v[1]);
        }
        if (tokens == 0)
            throw new UserError($"The {samples} validation samples have no token the loss counts (every position is masked); check Data.EodMaskLoss and the SFT loss masks, or set Training.EvalInterval = null.");
        return weighted / tokens;
    }

    /// <summary>
    /// With pipeline stages: the forward-only schedule over this data-parallel rank's micro-batches; the last stage's
    /// sums (loss × counted tokens, counted tokens) summed over the pipeline so every stage returns them.
    /// </summary>
    private (double Weighted, double Tokens) PipelineSums(int samples, int b, int seq, ContextParallel context)
    {
        var device = rank.Device;
        var dp = rank.Groups.Dp;
        int stride = b * dp.Size, microBatches = samples / stride;
        if (samples % stride != 0)
            throw new UserError($"Evaluation with pipeline stages needs whole micro-batches: EvalIters × GlobalBatchSize ({samples}) is not a multiple of MicroBatchSize × data parallel ({stride}).");
        using var scope = torch.NewDisposeScope();
        MicroBatchInputs Read(int m)
        {
            int first = dp.Rank * b + m * stride;
            var batch = Enumerable.Range(first, b).Select(i => validation.Sample(i)).ToArray();
            return MicroBatch.From(batch, seq, device, context, settings.Data.ResetAttentionMask).ForPipeline(context);
        }
        var sums = torch.zeros(6 + 2 * model.Config.Layers * model.Config.Experts, dtype: ScalarType.Float64, device: device);
        new PipelineRunner(model, rank.Groups.Pp, 0, 0).Step(Read, microBatches, sums, forwardOnly: true);
        var reduced = sums.narrow(0, 0, 2).to(rank.Groups.Pp.DeviceForScalars);
        rank.Groups.Pp.AllReduce(reduced);
        var v = reduced.cpu().data<double>().ToArray();
        return (v[0], v[1]);
    }
}

/// <summary>Evaluates every <c>EvalInterval</c> steps and after the last step, and puts the loss in that step's metrics.</summary>
public sealed class EvaluationObserver(Evaluator evaluator, int interval, int totalSteps) : ITrainingObserver
{
    public StepMetrics StepEnded(StepMetrics m) =>
        m.Step % interval == 0 || m.Step == totalSteps ? m with { ValLoss = evaluator.Loss() } : m;
}
