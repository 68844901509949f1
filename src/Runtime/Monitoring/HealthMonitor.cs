using System.Globalization;
using Moe.Dsl;
using Moe.Runtime.Training;

namespace Moe.Runtime.Monitoring;

/// <summary>
/// The tutorial's Step 5 as code ("verify training health": shared/background/megatron-mixtral-tutorial.md):
/// after every step, each signal is compared with its bound in <see cref="Health"/>, and a signal that leaves
/// its range gets one warning line — the signal, its value, the bound, the recipe setting to change and in
/// which direction — recorded in the step's metrics. It warns once per episode: again only after the signal
/// has come back in range. A signal in <see cref="Health.StopOn"/> also sets the step's stop reason.
///
/// | signal | measured on | remedy (the tutorial's) |
/// |---|---|---|
/// | loss | mean LM loss of the last LossWindow steps vs the LossWindow before | data formatting, eod_mask_loss, packing; the learning rate |
/// | drop rate | dropped / routed assignments, mean over Window steps | raise the capacity factor gradually |
/// | load imbalance | per layer, max / mean routed assignments per expert, summed over Window | raise the aux-loss (or z-loss) coefficient |
/// | router collapse | per layer, share of the TopK busiest experts | raise the aux-loss coefficient, restart from a checkpoint |
/// | memory headroom | free / total device memory after the step | capacity factor, then padding, then micro-batch; never the global batch first |
/// | all-to-all share | all-to-all seconds / step seconds, mean over Window | keep EP within a node, check the fabric |
/// </summary>
public sealed class HealthMonitor(RecipeSettings settings, TextWriter output) : ITrainingObserver
{
    private readonly Health _h = settings.Health;
    private readonly Queue<StepMetrics> _window = new();
    private readonly List<double> _lmLosses = [];
    private HealthSignal _active = HealthSignal.None;

    /// <summary>Signals out of range after the last step.</summary>
    public HealthSignal Active => _active;

    public StepMetrics StepEnded(StepMetrics m)
    {
        _window.Enqueue(m);
        while (_window.Count > Math.Max(1, _h.Window)) _window.Dequeue();
        _lmLosses.Add(m.LmLoss);
        var outOfRange = new List<HealthWarning>();
        void Add(HealthSignal signal, string? message)
        {
            if (message is not null) outOfRange.Add(new HealthWarning(signal, message));
        }
        Add(HealthSignal.Loss, CheckLoss());
        Add(HealthSignal.DropRate, CheckDropRate());
        var (imbalance, collapse) = CheckRouting();
        Add(HealthSignal.LoadImbalance, imbalance);
        Add(HealthSignal.RouterCollapse, collapse);
        Add(HealthSignal.MemoryHeadroom, CheckMemory(m));
        Add(HealthSignal.AllToAll, CheckAllToAll());

        var fresh = outOfRange.Where(w => (_active & w.Signal) == 0).ToArray();
        _active = outOfRange.Aggregate(HealthSignal.None, (all, w) => all | w.Signal);
        foreach (var w in fresh) output.WriteLine($"health warning [{w.Signal}] step {m.Step}: {w.Message}");
        var stop = outOfRange.FirstOrDefault(w => (_h.StopOn & w.Signal) != 0);
        return m with
        {
            Warnings = [.. m.Warnings, .. fresh],
            StopReason = m.StopReason ?? (stop is null ? null
                : $"Stopped after step {m.Step} because {stop.Signal} is in Health.StopOn: {stop.Message}"),
        };
    }

    private (int First, int Last) Span => (_window.Peek().Step, _window.Last().Step);

    private string StepsText => Span.First == Span.Last ? $"step {Span.Last}" : $"mean of steps {Span.First}–{Span.Last}";

    private string? CheckLoss()
    {
        if (_h.LossWindow is not int w || w < 1 || _lmLosses.Count < 2 * w) return null;
        int n = _lmLosses.Count;
        double before = _lmLosses.Skip(n - 2 * w).Take(w).Average(), last = _lmLosses.Skip(n - w).Average();
        if (last < before) return null;
        return I($"training loss is not decreasing: mean lm loss {last:F4} over steps {n - w + 1}–{n} vs {before:F4} over steps {n - 2 * w + 1}–{n - w} (Health.LossWindow {w}); ") +
            I($"lower Training.LearningRate (now {settings.Training.LearningRate:G3}) and check the data formatting: Data.EodMaskLoss (now {settings.Data.EodMaskLoss}), Data.Format (now {settings.Data.Format}) and sequence packing");
    }

    private string? CheckDropRate()
    {
        if (_h.MaxDropRate is not double bound) return null;
        double rate = _window.Average(s => s.DropRate);
        if (!(rate > bound)) return null;
        var perLayer = _window.Where(s => s.DropRatePerLayer is not null).Select(s => s.DropRatePerLayer!).ToArray();
        string worst = "";
        if (perLayer.Length > 0)
        {
            var mean = Enumerable.Range(0, perLayer[0].Length).Select(l => perLayer.Average(p => p[l])).ToArray();
            int l = Array.IndexOf(mean, mean.Max());
            worst = I($", worst layer {l}: {mean[l]:P1}");
        }
        string remedy = settings.Capacity.Factor is double f
            ? I($"raise Capacity.Factor gradually (now {f:G4}; e.g. {Math.Round(f * 1.25, 3):G4})")
            : "raise Capacity.Factor";
        return I($"token drop rate {rate:P1} ({StepsText}{worst}) is above Health.MaxDropRate {bound:P1}: {remedy}");
    }

    private (string? Imbalance, string? Collapse) CheckRouting()
    {
        if (_h.MaxLoadImbalance is null && _h.CollapseShare is null) return (null, null);
        var counts = _window.Select(s => s.RoutedPerExpert ?? s.TokensPerExpert).ToArray();
        int layers = counts[^1].Length;
        if (layers == 0) return (null, null);
        int k = settings.TopK;
        double worstRatio = 0, worstShare = 0;
        int ratioLayer = 0, ratioExpert = 0, shareLayer = 0;
        double ratioExpertShare = 0;
        int[] shareExperts = [];
        for (int l = 0; l < layers; l++)
        {
            int experts = counts[^1][l].Length;
            var sum = new double[experts];
            foreach (var c in counts)
                if (l < c.Length)
                    for (int e = 0; e < Math.Min(experts, c[l].Length); e++) sum[e] += c[l][e];
            double total = sum.Sum();
            if (total <= 0) continue;
            double ratio = sum.Max() / (total / experts);
            if (ratio > worstRatio)
            {
                (worstRatio, ratioLayer, ratioExpert) = (ratio, l, Array.IndexOf(sum, sum.Max()));
                ratioExpertShare = sum.Max() / total;
            }
            var top = Enumerable.Range(0, experts).OrderByDescending(e => sum[e]).ThenBy(e => e).Take(Math.Min(k, experts)).ToArray();
            double share = top.Sum(e => sum[e]) / total;
            if (share > worstShare) (worstShare, shareLayer, shareExperts) = (share, l, top.Order().ToArray());
        }
        string aux = settings.Router.LoadBalancing == LoadBalancing.None
            ? "set Router.LoadBalancing = LoadBalancing.AuxLoss (now None)"
            : I($"raise Router.AuxLossCoeff (now {settings.AuxLossCoeff:G3}; e.g. {settings.AuxLossCoeff * 2:G3})");
        string? imbalance = _h.MaxLoadImbalance is double bound && worstRatio > bound
            ? I($"expert load imbalance {worstRatio:F2} (max/mean routed tokens, {StepsText}) in layer {ratioLayer}: expert {ratioExpert} takes {ratioExpertShare:P0} of the layer's assignments; above Health.MaxLoadImbalance {bound:G3}: {aux} or Router.ZLossCoeff")
            : null;
        int expertCount = counts[^1][0].Length;
        string? collapse = _h.CollapseShare is double cb && worstShare > cb
            ? I($"router collapse in layer {shareLayer}: experts {string.Join(", ", shareExperts)} take {worstShare:P0} of the layer's assignments ({StepsText}; uniform routing gives {(double)k / expertCount:P0}), above Health.CollapseShare {cb:P0}: {aux} and restart from the last checkpoint (Checkpoint.Load)")
            : null;
        return (imbalance, collapse);
    }

    private string? CheckMemory(StepMetrics m)
    {
        if (_h.MinMemoryHeadroom is not double bound || m.MemoryHeadroom is not double free || free >= bound) return null;
        return I($"device memory headroom {free:P1} ({m.MemoryUsedBytes / (double)(1L << 30):F1} of {m.MemoryTotalBytes / (double)(1L << 30):F1} GiB in use) is below Health.MinMemoryHeadroom {bound:P0}: ") + MemoryRemedy(settings);
    }

    /// <summary>The tutorial's order for memory: capacity factor, then padding, then micro-batch size; never the global batch first.</summary>
    public static string MemoryRemedy(RecipeSettings s)
    {
        var steps = new List<string>();
        if (s.Capacity.Factor is double f) steps.Add(I($"lower Capacity.Factor (now {f:G4})"));
        if (s.Capacity.PadToCapacity) steps.Add("set Capacity.PadToCapacity = false");
        if (s.Training.MicroBatchSize > 1) steps.Add(I($"lower Training.MicroBatchSize (now {s.Training.MicroBatchSize})"));
        string keep = "; keep Training.GlobalBatchSize, which sets the learning-rate schedule's tokens per step";
        return steps.Count == 0
            ? "Training.MicroBatchSize is already 1 and the layer is dropless: spread the model over more GPUs (Parallelism.Expert, Parallelism.Tensor) or shorten Data.SequenceLength" + keep
            : string.Join(", then ", steps) + keep;
    }

    private string? CheckAllToAll()
    {
        if (_h.MaxAllToAllShare is not double bound) return null;
        var shares = _window.Where(s => s.AllToAllShare is not null).Select(s => s.AllToAllShare!.Value).ToArray();
        if (shares.Length == 0) return null;
        double share = shares.Average();
        if (!(share > bound)) return null;
        return I($"the expert-parallel all-to-all takes {share:P0} of the step ({StepsText}), above Health.MaxAllToAllShare {bound:P0}: keep the expert-parallel group inside one node (lower Parallelism.Expert, now {settings.Parallelism.Expert}) and check the fabric (Nccl.IbHca, Nccl.SocketInterface; NCCL_DEBUG=INFO)");
    }

    private static string I(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);
}
