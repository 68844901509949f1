using System.Globalization;
using Moe.Dsl;
using Moe.Dsl.Validation;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Devices;
using Moe.Runtime.Training;

namespace Moe.Runtime.Commands.Train;

/// <summary>
/// Trains a recipe: resolves its files, validates it with the rule set (including start-up rules:
/// world size, files), then runs the <see cref="Trainer"/>. Relative paths resolve against the current
/// directory first, then against the recipe's output directory (where recipes ship their data).
/// </summary>
public static class TrainCommand
{
    public static int Execute(RecipeSettings settings, string device, string? metricsPath, int logEvery, TextWriter log)
    {
        settings = ResolvePaths(settings);
        int? world = int.TryParse(Environment.GetEnvironmentVariable("WORLD_SIZE"), NumberStyles.Integer, CultureInfo.InvariantCulture, out int w) ? w : null;
        RecipeFindings.ThrowIfInvalid(settings, new StartUpContext { WorldSize = world ?? settings.Parallelism.Gpus });
        if (settings.Parallelism.Gpus > 1)
            throw new UserError($"{settings.Name} asks for {settings.Parallelism.Gpus} GPUs; this runtime trains in one process (pass --gpus 1 to try the recipe on one device). Multi-GPU training comes with the distributed runtime.");
        var dev = ComputeDevice.Resolve(device);
        using var source = new IndexedSampleSource(settings, settings.Model.EosTokenId);
        using var metrics = new MetricsWriter(metricsPath);
        using var trainer = new Trainer(settings, dev, log);
        log.WriteLine($"training {settings.Name}: {settings.Training.Steps} steps of {settings.Training.GlobalBatchSize} × {settings.Data.SequenceLength} tokens on {device}");
        var save = settings.Checkpoint;
        var result = trainer.Run(source, log, metrics, logEvery, step =>
        {
            if (save.Save is string dir && save.Interval is int every && step % every == 0 && step != settings.Training.Steps)
                Save(trainer, dir, step, log);
        });
        if (save.Save is string final) Save(trainer, final, settings.Training.Steps, log);
        var first = result.Steps.Take(5).Average(m => m.LmLoss);
        var last = result.Steps.TakeLast(5).Average(m => m.LmLoss);
        log.WriteLine(string.Create(CultureInfo.InvariantCulture, $"done: lm_loss {first:F3} (first 5 steps) → {last:F3} (last 5 steps)"));
        return 0;
    }

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
