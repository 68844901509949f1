using System.Globalization;
using Moe.Dsl;
using Moe.Dsl.Validation;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Devices;
using Moe.Runtime.Monitoring;
using Moe.Runtime.Training;

namespace Moe.Runtime.Commands.Train;

/// <summary>
/// Trains a recipe: resolves its files, validates it with the rule set (including start-up rules:
/// world size, files), then runs the <see cref="Trainer"/>. Relative paths resolve against the current
/// directory first, then against the recipe's output directory (where recipes ship their data).
/// </summary>
public static class TrainCommand
{
    /// <summary>The run's own switches (the recipe overrides are already in the settings).</summary>
    public sealed record Request(string Device, string? RunDir = null, string? Metrics = null, bool AppendMetrics = false, string? TensorBoard = null, int LogEvery = 10);

    /// <summary>Exit code of a run stopped by a signal in Health.StopOn (its metrics and a checkpoint are written first).</summary>
    public const int HealthStopExitCode = 3;

    public static int Execute(RecipeSettings settings, Request request, TextWriter log)
    {
        settings = ResolvePaths(settings);
        int? world = int.TryParse(Environment.GetEnvironmentVariable("WORLD_SIZE"), NumberStyles.Integer, CultureInfo.InvariantCulture, out int w) ? w : null;
        RecipeFindings.ThrowIfInvalid(settings, new StartUpContext { WorldSize = world ?? settings.Parallelism.Gpus });
        if (settings.Parallelism.Gpus > 1)
            throw new UserError($"{settings.Name} asks for {settings.Parallelism.Gpus} GPUs; this runtime trains in one process (pass --gpus 1 to try the recipe on one device). Multi-GPU training comes with the distributed runtime.");
        int warmup = settings.Training.WarmupSteps;
        settings = CapWarmup(settings);   // MOE0213 has said so on stderr
        var dev = ComputeDevice.Resolve(request.Device);
        var started = DateTimeOffset.UtcNow;

        // Everything that writes is opened before the model is built: a directory that cannot be written fails now.
        var run = RunDirectory.Create(request.RunDir, settings, started);
        run.WriteEnvironment(request.Device, started);
        using var fileLog = run.OpenLog();
        using var metrics = new MetricsWriter(request.Metrics ?? run.File(RunDirectory.MetricsFile), run.Id, request.AppendMetrics);
        string tensorBoard = request.TensorBoard ?? (Path.IsPathRooted(settings.Health.TensorBoardDir) ? settings.Health.TensorBoardDir : Path.Combine(run.Path, settings.Health.TensorBoardDir));
        using var events = new TensorBoardWriter(tensorBoard);
        using var source = new IndexedSampleSource(settings, settings.Model.EosTokenId);
        using var validation = settings.Training.EvalInterval is null ? null
            : new IndexedSampleSource(settings, settings.Model.EosTokenId, split: 1, samples: Evaluator.SampleCount(settings));

        TrainResult Train(ITrainingObserver? bar, TextWriter console)
        {
            var logs = new TeeWriter(console, fileLog);
            if (warmup != settings.Training.WarmupSteps)
                fileLog.WriteLine($"note: WarmupSteps ({warmup}) exceeds Steps ({settings.Training.Steps}); the warm-up is capped at {settings.Training.WarmupSteps} steps (MOE0213).");
            using var trainer = new Trainer(settings, dev, logs);
            logs.WriteLine($"training {settings.Name}: {settings.Training.Steps} steps of {settings.Training.GlobalBatchSize} × {settings.Data.SequenceLength} tokens on {request.Device}; run directory {run.Path}");
            var observers = new List<ITrainingObserver> { new DeviceStats(trainer.Model.Config, settings.Data.SequenceLength, dev) };
            if (settings.Training.EvalInterval is int every)
                observers.Add(new EvaluationObserver(new Evaluator(trainer.Model, validation!, settings, dev), every, settings.Training.Steps));
            observers.Add(new HealthMonitor(settings, logs));
            observers.Add(metrics);
            observers.Add(events);
            observers.Add(new ProgressLines(bar is null ? logs : fileLog, request.LogEvery, settings.Training.Steps));
            if (bar is not null) observers.Add(bar);
            var save = settings.Checkpoint;
            var result = trainer.Run(source, new TrainingObservers(observers), step =>
            {
                if (save.Save is string dir && save.Interval is int interval && step % interval == 0 && step != settings.Training.Steps)
                    Save(trainer, dir, step, logs);
            });
            if (save.Save is string final && result.Steps.Count > 0) Save(trainer, final, result.Steps[^1].Step, logs);
            var first = result.Steps.Take(5).Average(m => m.LmLoss);
            var last = result.Steps.TakeLast(5).Average(m => m.LmLoss);
            string val = result.Steps.LastOrDefault(m => m.ValLoss is not null)?.ValLoss is double v ? string.Create(CultureInfo.InvariantCulture, $", validation loss {v:F3}") : "";
            logs.WriteLine(string.Create(CultureInfo.InvariantCulture, $"done: lm_loss {first:F3} (first 5 steps) → {last:F3} (last 5 steps){val}; run directory {run.Path}"));
            if (result.StopReason is string why) logs.WriteLine("stopped: " + why);
            return result;
        }

        // A terminal gets a progress bar on stderr; lines for stdout then pass through the bar's console when stdout is the terminal too.
        var outcome = Console.IsErrorRedirected
            ? Train(null, log)
            : ProgressBar.Show(settings.Training.Steps, (bar, lines) => Train(bar, Console.IsOutputRedirected ? log : lines));
        return outcome.StopReason is null ? 0 : HealthStopExitCode;
    }

    /// <summary>A warm-up longer than the run is capped at Steps (MOE0213 warns): a short trial run keeps the recipe's schedule otherwise.</summary>
    public static RecipeSettings CapWarmup(RecipeSettings s) =>
        s.Training.WarmupSteps > s.Training.Steps ? s with { Training = s.Training with { WarmupSteps = s.Training.Steps } } : s;

    private static void Save(Trainer trainer, string dir, int step, TextWriter log)
    {
        string path = Path.Combine(dir, $"iter_{step:D7}");
        MixtralStateDictAdapter.Save(trainer.Model, path);
        File.WriteAllText(Path.Combine(dir, "latest_checkpointed_iteration.txt"), step.ToString(CultureInfo.InvariantCulture));
        log.WriteLine($"saved {path}");
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
