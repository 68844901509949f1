using System.Globalization;
using Moe.Dsl;
using Moe.Dsl.Validation;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Devices;
using Moe.Dsl.Layout;
using Moe.Runtime.Distributed;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.Training;
using TorchSharp;

namespace Moe.Runtime.Commands.Train;

/// <summary>
/// Trains a recipe: resolves its files, validates it with the rule set (including start-up rules:
/// world size, files), then runs the <see cref="Trainer"/>. Relative paths resolve against the current
/// directory first, then against the recipe's output directory (where recipes ship their data).
/// </summary>
public static class TrainCommand
{
    /// <summary>What the verb was asked to do.</summary>
    /// <param name="Settings">The recipe with the command line's overrides.</param>
    /// <param name="Device">cpu or cuda.</param>
    /// <param name="MetricsPath">One JSON line per step goes here (rank 0), or nowhere.</param>
    /// <param name="LogEvery">Progress every this many steps when stderr is not a terminal.</param>
    /// <param name="Simulate">Run the recipe's topology on the CPU with in-process ranks (<see cref="SimulationPlan"/>).</param>
    /// <param name="AllowChanged">Settings a loaded checkpoint may differ in (--allow-changed).</param>
    public sealed record Request(RecipeSettings Settings, string Device, string? MetricsPath, int LogEvery, bool Simulate = false, IReadOnlyList<string>? AllowChanged = null);

    public static int Execute(RecipeSettings settings, string device, string? metricsPath, int logEvery, TextWriter log) =>
        Execute(new Request(settings, device, metricsPath, logEvery), log);

    public static int Execute(Request r, TextWriter log)
    {
        var settings = ResolvePaths(r.Settings);
        if (r.Simulate) return Simulate(settings, r, log);
        int? world = int.TryParse(Environment.GetEnvironmentVariable("WORLD_SIZE"), NumberStyles.Integer, CultureInfo.InvariantCulture, out int w) ? w : null;
        RecipeFindings.ThrowIfInvalid(settings, new StartUpContext { WorldSize = world ?? settings.Parallelism.Gpus });
        if (settings.Parallelism.Gpus > 1)
            throw new UserError($"{settings.Name} asks for {settings.Parallelism.Gpus} GPUs; launching one process per GPU needs the NCCL backend, which this build does not have yet. " +
                $"Run the layout on the CPU with `train --simulate`, or pass --gpus 1 to train on one device.");
        var dev = ComputeDevice.Resolve(r.Device);
        using var source = new IndexedSampleSource(settings, settings.Model.EosTokenId);
        using var metrics = new MetricsWriter(r.MetricsPath);
        using var signals = new StopSignals(log);
        using var trainer = new Trainer(settings, dev, log, CheckpointLoadOptions.Parse(r.AllowChanged));
        log.WriteLine($"training {settings.Name}: {Steps(trainer, settings)} of {settings.Training.GlobalBatchSize} × {settings.Data.SequenceLength} tokens on {r.Device}");
        var checkpoints = new CheckpointSchedule(trainer, signals, log);   // saves (--save, --save-interval, --keep-last) and SIGINT/SIGTERM
        var result = trainer.Run(source, log, metrics, r.LogEvery, checkpoints.AfterStep);
        Summarise(result, log);
        return checkpoints.ExitCode;
    }

    private static string Steps(Trainer trainer, RecipeSettings s) =>
        trainer.CompletedSteps == 0 ? $"{s.Training.Steps} steps" : $"steps {trainer.CompletedSteps + 1}–{s.Training.Steps} of {s.Training.Steps}";

    /// <summary>
    /// <c>train --simulate</c>: the recipe's topology as threads on the CPU (in-process backend), shrunk where the
    /// recipe is too large for that, with every change printed first.
    /// </summary>
    private static int Simulate(RecipeSettings settings, Request r, TextWriter log)
    {
        if (r.Device != "cpu") throw new UserError("--simulate runs on the CPU; leave out --device cuda.");
        bool dataExists = settings.Data.Prefix is string prefix && File.Exists(prefix + ".bin") && File.Exists(prefix + ".idx");
        var plan = SimulationPlan.For(settings, dataExists);
        var s = plan.Settings;
        RecipeFindings.ThrowIfInvalid(s, new StartUpContext { WorldSize = s.Parallelism.Gpus });
        var p = s.Parallelism;
        log.WriteLine($"simulating {s.Name}: {p.Gpus} ranks (TP {p.Tensor} · CP {p.Context} · PP {p.Pipeline}, EP {p.Expert} · ETP {p.EffectiveExpertTensor}; " +
            $"DP {p.DataParallel}, expert DP {p.ExpertDataParallel}) as threads on the CPU");
        foreach (var note in plan.Notes) log.WriteLine($"  {note}");
        var layout = new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);
        int threads = torch.get_num_threads();
        torch.set_num_threads(1);   // the ranks are the parallelism; one intra-op thread each
        try
        {
            using var signals = new StopSignals(log);
            var load = CheckpointLoadOptions.Parse(r.AllowChanged);
            var results = InProcessJob.Run(layout, Timeouts.Collective(s), rank =>
            {
                using ISampleSource source = plan.SyntheticData
                    ? new SyntheticSampleSource(s.Model.VocabSize, s.Data.SequenceLength, s.Training.Seed)
                    : new IndexedSampleSource(s, s.Model.EosTokenId);
                var rankLog = rank.Reports ? log : TextWriter.Null;
                using var metrics = new MetricsWriter(rank.Reports ? r.MetricsPath : null);
                using var trainer = new Trainer(s, rank, rankLog, load);
                var checkpoints = new CheckpointSchedule(trainer, signals, rankLog);
                return (Result: trainer.Run(source, rankLog, metrics, r.LogEvery, checkpoints.AfterStep), checkpoints.ExitCode);
            });
            Summarise(results[0].Result, log);
            return results[0].ExitCode;
        }
        finally
        {
            torch.set_num_threads(threads);
        }
    }

    private static void Summarise(TrainResult result, TextWriter log)
    {
        if (result.Steps.Count == 0)
        {
            log.WriteLine("done: no step left to train.");
            return;
        }
        var first = result.Steps.Take(5).Average(m => m.LmLoss);
        var last = result.Steps.TakeLast(5).Average(m => m.LmLoss);
        log.WriteLine(string.Create(CultureInfo.InvariantCulture, $"done: lm_loss {first:F3} (first 5 steps) → {last:F3} (last 5 steps)"));
    }

    /// <summary>Data.Prefix, Data.Tokenizer and Checkpoint.Load relative to the working directory, else to the recipe's output directory.</summary>
    public static RecipeSettings ResolvePaths(RecipeSettings s)
    {
        string? Resolve(string? path, params string[] probes)
        {
            if (path is null || Path.IsPathRooted(path)) return path;
            string[] roots = [Directory.GetCurrentDirectory(), AppContext.BaseDirectory];
            foreach (var root in roots)
            {
                string candidate = Path.GetFullPath(Path.Combine(root, path));
                if (probes.Length == 0 ? File.Exists(candidate) || Directory.Exists(candidate) : probes.All(p => File.Exists(candidate + p)))
                    return candidate;
            }
            return Path.GetFullPath(path);
        }
        return s with
        {
            Data = s.Data with { Prefix = Resolve(s.Data.Prefix, ".bin", ".idx"), Tokenizer = Resolve(s.Data.Tokenizer) },
            Checkpoint = s.Checkpoint with { Load = Resolve(s.Checkpoint.Load) },
        };
    }
}
