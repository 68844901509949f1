using System.Globalization;
using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Dsl.Validation;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.Devices;
using Moe.Runtime.Distributed;
using Moe.Runtime.Distributed.InProcess;
using Moe.Runtime.Distributed.Launch;
using Moe.Runtime.Monitoring;
using Moe.Runtime.Training;
using TorchSharp;

namespace Moe.Runtime.Commands.Train;

/// <summary>
/// Trains a recipe. Resolves its files and validates it with the rule set (start-up rules included: world size,
/// files, the GPU), then runs the <see cref="Trainer"/> in one of four ways:
/// <list type="bullet">
/// <item>one rank (one device, CPU or GPU);</item>
/// <item>as a rank a launcher started (torchrun, srun, Moe's own launcher, or by hand): joins the job through the
/// bootstrap store and NCCL (<see cref="RankBootstrap"/>);</item>
/// <item>as the launcher itself, when a multi-GPU recipe is started plainly: one process per GPU on this node
/// (<see cref="NodeLauncher"/>);</item>
/// <item><c>--simulate</c>: the whole topology as threads on the CPU (<see cref="SimulationPlan"/>).</item>
/// </list>
/// Relative paths resolve against the current directory first, then against the recipe's output directory
/// (where recipes ship their data). Only the reporting rank (global rank 0) writes the run directory.
/// </summary>
public static class TrainCommand
{
    /// <summary>The run's own switches (the recipe overrides are already in the settings).</summary>
    /// <param name="Device">cpu or cuda.</param>
    /// <param name="RunDir">The run directory (default runs/&lt;recipe&gt;-&lt;UTC time&gt;).</param>
    /// <param name="Metrics">The metrics file (default: metrics.jsonl in the run directory).</param>
    /// <param name="AppendMetrics">Allow appending to a metrics file that holds another run.</param>
    /// <param name="TensorBoard">Where the event files go (default: the recipe's Health.TensorBoardDir in the run directory).</param>
    /// <param name="LogEvery">A progress line every this many steps.</param>
    /// <param name="Simulate">Run the recipe's topology on the CPU with in-process ranks.</param>
    /// <param name="Wiring">The recipe's generated layout, used when the command line left the topology as the recipe has it.</param>
    /// <param name="AllowChanged">Settings a loaded checkpoint may differ in (--allow-changed).</param>
    public sealed record Request(string Device, string? RunDir = null, string? Metrics = null, bool AppendMetrics = false, string? TensorBoard = null,
        int LogEvery = 10, bool Simulate = false, IRankLayout? Wiring = null, IReadOnlyList<string>? AllowChanged = null);

    /// <summary>Exit code of a run stopped by a signal in Health.StopOn (its metrics and a checkpoint are written first).</summary>
    public const int HealthStopExitCode = 3;

    public static int Execute(RecipeSettings settings, Request request, TextWriter log)
    {
        settings = ResolvePaths(settings);
        if (request.Simulate) return Simulate(settings, request, log);
        var launch = LaunchEnvironment.Detect();
        if (launch is null && settings.Parallelism.Gpus > 1) return LaunchRanks(settings, request, log);
        string? gpu = null;
        if (launch is not null)
        {
            if (request.Device != "cuda")
                throw new UserError($"This process is rank {launch.Rank} of {launch.WorldSize} (started by {launch.Launcher}); ranks train on GPUs through NCCL, so pass --device cuda. To run a layout on the CPU, use `train --simulate` without a launcher.");
            gpu = RankBootstrap.SelectDevice(launch);
        }
        var dev = ComputeDevice.Resolve(request.Device);
        RecipeFindings.ThrowIfInvalid(settings, StartUp(settings, launch?.WorldSize, dev));
        int warmup = settings.Training.WarmupSteps;
        settings = CapWarmup(settings);   // MOE0213 has said so on stderr
        foreach (var (name, value) in settings.Nccl.ToEnvironment()) NativeEnvironment.Set(name, value);
        var timeout = Timeouts.Collective(settings);
        using var signals = new StopSignals(log);
        if (launch is null)
        {
            var single = RankContext.Single(settings, dev);
            try { return TrainRank(settings, request, single, warmup, signals, log); }
            finally { single.Groups.Dispose(); }
        }
        RankBootstrap job;
        try
        {
            job = RankBootstrap.Join(launch, LayoutSource.For(settings, request.Wiring), dev, timeout, log);
        }
        catch (Exception e) when (e is not UserError)
        {
            throw new UserError($"rank {launch.Rank} could not join the job: {e.Message}", e);
        }
        using (job)
        {
            if (launch.Rank == 0) log.WriteLine($"rank 0 of {launch.WorldSize}: GPU {gpu}, {job.NcclDescription}");
            try
            {
                return TrainRank(settings, request, new RankContext(job.Groups, dev), warmup, signals, log);
            }
            catch (Exception e)
            {
                job.RaiseAbort(e.Message);
                throw;
            }
        }
    }

    /// <summary>Trains one rank: the reporting rank opens the run directory and every writer; all ranks evaluate and check health alike.</summary>
    private static int TrainRank(RecipeSettings settings, Request request, RankContext rank, int warmup, StopSignals signals, TextWriter log)
    {
        var started = DateTimeOffset.UtcNow;
        var dev = rank.Device;
        var disposables = new List<IDisposable>();
        try
        {
            RunDirectory? run = null;
            TextWriter fileLog = TextWriter.Null;
            var writers = new List<ITrainingObserver>();
            if (rank.Reports)
            {
                // Everything that writes is opened before the model is built: a directory that cannot be written fails now.
                run = RunDirectory.Create(request.RunDir, settings, started);
                run.WriteEnvironment(request.Device, started);
                fileLog = Keep(run.OpenLog());
                var metrics = Keep(new MetricsWriter(request.Metrics ?? run.File(RunDirectory.MetricsFile), run.Id, request.AppendMetrics));
                string tensorBoard = request.TensorBoard ?? (Path.IsPathRooted(settings.Health.TensorBoardDir) ? settings.Health.TensorBoardDir : Path.Combine(run.Path, settings.Health.TensorBoardDir));
                writers.Add(metrics);
                writers.Add(Keep(new TensorBoardWriter(tensorBoard)));
            }
            using ISampleSource source = new IndexedSampleSource(settings, settings.Model.EosTokenId);
            using var validation = settings.Training.EvalInterval is null ? null
                : new IndexedSampleSource(settings, settings.Model.EosTokenId, split: 1, samples: Evaluator.SampleCount(settings));
            if (warmup != settings.Training.WarmupSteps)
                fileLog.WriteLine($"note: WarmupSteps ({warmup}) exceeds Steps ({settings.Training.Steps}); the warm-up is capped at {settings.Training.WarmupSteps} steps (MOE0213).");

            int signalled = 0;
            TrainResult Train(ITrainingObserver? bar, TextWriter console)
            {
                var logs = rank.Reports ? new TeeWriter(console, fileLog) : TextWriter.Null;
                using var trainer = new Trainer(settings, rank, logs, CheckpointLoadOptions.Parse(request.AllowChanged));
                var p = settings.Parallelism;
                logs.WriteLine($"training {settings.Name}: {Steps(trainer, settings)} of {settings.Training.GlobalBatchSize} × {settings.Data.SequenceLength} tokens on " +
                    (p.Gpus == 1 ? request.Device : $"{p.Gpus} GPUs (TP {p.Tensor}, PP {p.Pipeline}, CP {p.Context}, EP {p.Expert}, DP {p.DataParallel})") + $"; run directory {run?.Path}");
                var observers = Observers(settings, trainer, validation, rank, logs, bar is null ? logs : fileLog, writers, request.LogEvery);
                if (bar is not null) observers.Add(bar);
                // Saves (--save, --save-interval, --keep-last, and when a run stops early) and SIGINT/SIGTERM.
                var checkpoints = new CheckpointSchedule(trainer, signals, logs);
                var result = trainer.Run(source, new TrainingObservers(observers), checkpoints.AfterStep);
                signalled = checkpoints.ExitCode;
                Summarise(result, logs, run);
                return result;
            }

            // A terminal gets a progress bar on stderr; lines for stdout then pass through the bar's console when stdout is the terminal too.
            var outcome = !rank.Reports || Console.IsErrorRedirected
                ? Train(null, log)
                : ProgressBar.Show(settings.Training.Steps, (bar, lines) => Train(bar, Console.IsOutputRedirected ? log : lines));
            return signalled != 0 ? signalled : outcome.StopReason is null ? 0 : HealthStopExitCode;
        }
        finally
        {
            for (int i = disposables.Count - 1; i >= 0; i--) disposables[i].Dispose();
        }

        T Keep<T>(T d) where T : IDisposable
        {
            disposables.Add(d);
            return d;
        }
    }

    /// <summary>
    /// The observer chain of a rank: device statistics, evaluation (collective: every rank takes part) and the
    /// health checks on every rank, then the writers the reporting rank was given, then progress lines.
    /// </summary>
    private static List<ITrainingObserver> Observers(RecipeSettings settings, Trainer trainer, ISampleSource? validation, RankContext rank,
        TextWriter logs, TextWriter progress, IEnumerable<ITrainingObserver> writers, int logEvery)
    {
        var observers = new List<ITrainingObserver> { new DeviceStats(trainer.Model.Config, settings.Data.SequenceLength, rank.Device) };
        if (settings.Training.EvalInterval is int every)
            observers.Add(new EvaluationObserver(new Evaluator(trainer.Model, validation!, settings, rank), every, settings.Training.Steps));
        observers.Add(new HealthMonitor(settings, logs));
        observers.AddRange(writers);
        if (rank.Reports) observers.Add(new ProgressLines(progress, logEvery, settings.Training.Steps));
        return observers;
    }

    /// <summary>Start-up facts for the rule set: the launcher's world size and, on CUDA, whether the GPU predates Blackwell (MOE0904).</summary>
    private static StartUpContext StartUp(RecipeSettings settings, int? world, TorchSharp.torch.Device device)
    {
        bool preBlackwell = false;
        if (device.type == DeviceType.CUDA)
        {
            try { preBlackwell = CudaDriver.ComputeCapability().Major < 10; }
            catch (Exception e) when (e is DllNotFoundException or InvalidOperationException) { }
        }
        return new StartUpContext { WorldSize = world ?? settings.Parallelism.Gpus, PreBlackwellGpu = preBlackwell };
    }

    /// <summary>
    /// A multi-GPU recipe started plainly: this process becomes the node's launcher and starts one rank per GPU
    /// (each is this program again, seeing the launcher's variables).
    /// </summary>
    private static int LaunchRanks(RecipeSettings settings, Request request, TextWriter log)
    {
        int gpus = settings.Parallelism.Gpus;
        RecipeFindings.ThrowIfInvalid(settings, new StartUpContext { WorldSize = gpus });
        if (request.Device != "cuda")
            throw new UserError($"{settings.Name} asks for {gpus} GPUs, and ranks train on GPUs through NCCL: pass --device cuda. To run this layout on the CPU, use `train --simulate`; to train on one device, pass --gpus 1.");
        ComputeDevice.Resolve("cuda");
        int local = torch.cuda.device_count();
        if (local < gpus)
            throw new UserError($"{settings.Name} asks for {gpus} GPUs but this node has {local}. Start the ranks across nodes with torchrun --no-python or srun (docs/training.md), or pass --gpus {local}.");
        var run = RunDirectory.Create(request.RunDir, settings, DateTimeOffset.UtcNow);
        var result = NodeLauncher.Run(gpus, run.Path, settings.Nccl.ToEnvironment(), log);
        if (result.ExitCode == 0) return 0;
        throw new UserError(result.Message);
    }

    /// <summary>
    /// <c>train --simulate</c>: the recipe's topology as threads on the CPU (in-process backend), shrunk where the
    /// recipe is too large for that, with every change printed first.
    /// </summary>
    private static int Simulate(RecipeSettings settings, Request request, TextWriter log)
    {
        if (request.Device != "cpu") throw new UserError("--simulate runs on the CPU; leave out --device cuda.");
        if (LaunchEnvironment.Detect() is { } launch)
            throw new UserError($"--simulate runs every rank in this one process, but a launcher started it as rank {launch.Rank} of {launch.WorldSize}; start it plainly.");
        bool dataExists = settings.Data.Prefix is string prefix && File.Exists(prefix + ".bin") && File.Exists(prefix + ".idx");
        var plan = SimulationPlan.For(settings, dataExists);
        var s = plan.Settings;
        RecipeFindings.ThrowIfInvalid(s, new StartUpContext { WorldSize = s.Parallelism.Gpus });
        var p = s.Parallelism;
        log.WriteLine($"simulating {s.Name}: {p.Gpus} ranks (TP {p.Tensor} · CP {p.Context} · PP {p.Pipeline}, EP {p.Expert} · ETP {p.EffectiveExpertTensor}; " +
            $"DP {p.DataParallel}, expert DP {p.ExpertDataParallel}) as threads on the CPU");
        foreach (var note in plan.Notes) log.WriteLine($"  {note}");
        var layout = LayoutSource.For(s, request.Wiring);
        int threads = torch.get_num_threads();
        torch.set_num_threads(1);   // the ranks are the parallelism; one intra-op thread each
        try
        {
            using var signals = new StopSignals(log);   // one per process: the in-process ranks share it
            var results = InProcessJob.Run(layout, Timeouts.Collective(s), rank =>
            {
                if (!plan.SyntheticData) return TrainRank(s, request, rank, s.Training.WarmupSteps, signals, rank.Reports ? log : TextWriter.Null);
                return TrainSynthetic(s, request, rank, signals, log);
            });
            return results[0];
        }
        finally
        {
            torch.set_num_threads(threads);
        }
    }

    /// <summary>A simulated rank on seeded random tokens (the recipe's dataset is absent): metrics file and progress only.</summary>
    private static int TrainSynthetic(RecipeSettings s, Request request, RankContext rank, StopSignals signals, TextWriter log)
    {
        var rankLog = rank.Reports ? log : TextWriter.Null;
        using var source = new SyntheticSampleSource(s.Model.VocabSize, s.Data.SequenceLength, s.Training.Seed);
        using var metrics = rank.Reports && request.Metrics is not null ? new MetricsWriter(request.Metrics, "simulation", request.AppendMetrics) : null;
        using var trainer = new Trainer(s, rank, rankLog, CheckpointLoadOptions.Parse(request.AllowChanged));
        var observers = new List<ITrainingObserver> { new HealthMonitor(s, rankLog) };
        if (metrics is not null) observers.Add(metrics);
        if (rank.Reports) observers.Add(new ProgressLines(log, request.LogEvery, s.Training.Steps));
        var checkpoints = new CheckpointSchedule(trainer, signals, rankLog);
        var result = trainer.Run(source, new TrainingObservers(observers), checkpoints.AfterStep);
        if (rank.Reports) Summarise(result, log, null);
        return checkpoints.ExitCode != 0 ? checkpoints.ExitCode : result.StopReason is null ? 0 : HealthStopExitCode;
    }

    private static string Steps(Trainer trainer, RecipeSettings s) =>
        trainer.CompletedSteps == 0 ? $"{s.Training.Steps} steps" : $"steps {trainer.CompletedSteps + 1}–{s.Training.Steps} of {s.Training.Steps}";

    private static void Summarise(TrainResult result, TextWriter logs, RunDirectory? run)
    {
        if (result.Steps.Count == 0)
        {
            logs.WriteLine("done: no step left to train.");
            return;
        }
        var first = result.Steps.Take(5).Average(m => m.LmLoss);
        var last = result.Steps.TakeLast(5).Average(m => m.LmLoss);
        string val = result.Steps.LastOrDefault(m => m.ValLoss is not null)?.ValLoss is double v ? string.Create(CultureInfo.InvariantCulture, $", validation loss {v:F3}") : "";
        logs.WriteLine(string.Create(CultureInfo.InvariantCulture, $"done: lm_loss {first:F3} (first 5 steps) → {last:F3} (last 5 steps){val}") + (run is null ? "" : $"; run directory {run.Path}"));
        if (result.StopReason is string why) logs.WriteLine("stopped: " + why);
    }

    /// <summary>A warm-up longer than the run is capped at Steps (MOE0213 warns): a short trial run keeps the recipe's schedule otherwise.</summary>
    public static RecipeSettings CapWarmup(RecipeSettings s) =>
        s.Training.WarmupSteps > s.Training.Steps ? s with { Training = s.Training with { WarmupSteps = s.Training.Steps } } : s;

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
