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
    /// <param name="Wiring">The recipe's generated layout, used when the command line left the topology as the recipe has it.</param>
    public sealed record Request(RecipeSettings Settings, string Device, string? MetricsPath, int LogEvery, bool Simulate = false, IRankLayout? Wiring = null);

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
        using var trainer = new Trainer(settings, dev, log);
        log.WriteLine($"training {settings.Name}: {settings.Training.Steps} steps of {settings.Training.GlobalBatchSize} × {settings.Data.SequenceLength} tokens on {r.Device}");
        var save = settings.Checkpoint;
        var result = trainer.Run(source, log, metrics, r.LogEvery, step =>
        {
            if (save.Save is string dir && save.Interval is int every && step % every == 0 && step != settings.Training.Steps)
                Save(trainer, dir, step, log);
        });
        if (save.Save is string final) Save(trainer, final, settings.Training.Steps, log);
        Summarise(result, log);
        return 0;
    }

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
        var layout = LayoutSource.For(s, r.Wiring);
        int threads = torch.get_num_threads();
        torch.set_num_threads(1);   // the ranks are the parallelism; one intra-op thread each
        try
        {
            var results = InProcessJob.Run(layout, Timeouts.Collective(s), rank =>
            {
                using ISampleSource source = plan.SyntheticData
                    ? new SyntheticSampleSource(s.Model.VocabSize, s.Data.SequenceLength, s.Training.Seed)
                    : new IndexedSampleSource(s, s.Model.EosTokenId);
                using var metrics = new MetricsWriter(rank.Reports ? r.MetricsPath : null);
                using var trainer = new Trainer(s, rank, rank.Reports ? log : TextWriter.Null);
                return trainer.Run(source, rank.Reports ? log : TextWriter.Null, metrics, r.LogEvery);
            });
            Summarise(results[0], log);
        }
        finally
        {
            torch.set_num_threads(threads);
        }
        return 0;
    }

    private static void Summarise(TrainResult result, TextWriter log)
    {
        var first = result.Steps.Take(5).Average(m => m.LmLoss);
        var last = result.Steps.TakeLast(5).Average(m => m.LmLoss);
        log.WriteLine(string.Create(CultureInfo.InvariantCulture, $"done: lm_loss {first:F3} (first 5 steps) → {last:F3} (last 5 steps)"));
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
