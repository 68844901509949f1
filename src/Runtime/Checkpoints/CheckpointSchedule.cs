using System.Runtime.InteropServices;
using Moe.Runtime.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Checkpoints;

/// <summary>
/// SIGINT and SIGTERM for a training process: the first asks the run to stop after the current step (saving first when
/// a save folder is set); a second stops the process at once, exit code 128 + signal. One per process — the in-process
/// ranks of <c>train --simulate</c> share it — and disposed when the run ends.
/// </summary>
public sealed class StopSignals : IDisposable
{
    private readonly PosixSignalRegistration[] _registrations;
    private readonly TextWriter _log;
    private int _received;

    public StopSignals(TextWriter log)
    {
        _log = log;
        _registrations = OperatingSystem.IsWindows() ? [] :
        [
            PosixSignalRegistration.Create(PosixSignal.SIGINT, On),
            PosixSignalRegistration.Create(PosixSignal.SIGTERM, On),
        ];
    }

    /// <summary>The first signal received: 0 for none, 2 for SIGINT, 15 for SIGTERM.</summary>
    public int Received => Volatile.Read(ref _received);

    /// <summary>The conventional exit code after a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM).</summary>
    public static int ExitCode(int signal) => 128 + signal;

    /// <summary>The signal's name.</summary>
    public static string Name(int signal) => signal switch { 2 => "SIGINT", 15 => "SIGTERM", _ => $"signal {signal}" };

    /// <summary>Records <paramref name="signal"/> as if it had arrived (tests; and a launcher that forwards a stop).</summary>
    public void Request(int signal)
    {
        if (Interlocked.CompareExchange(ref _received, signal, 0) == 0) return;
        _log.WriteLine($"{Name(signal)} again: stopping now, without finishing the step or the save (the last complete checkpoint stays the latest).");
        _log.Flush();
        Environment.Exit(ExitCode(signal));
    }

    private void On(PosixSignalContext context)
    {
        int signal = context.Signal == PosixSignal.SIGINT ? 2 : 15;
        context.Cancel = true;
        if (Received == 0) _log.WriteLine($"{Name(signal)}: finishing the current step, then saving (when --save is set) and stopping; send it again to stop at once.");
        Request(signal);
    }

    public void Dispose()
    {
        foreach (var r in _registrations) r.Dispose();
    }
}

/// <summary>
/// One rank's checkpoint duties during a run, called after every step: save every Checkpoint.Interval steps and after
/// the last step (when Checkpoint.Save is set), and stop after a signal — which every rank must see at the same step,
/// so each step ends with a max-reduction of the signal over the world (Megatron's exit-signal handler all-gathers its
/// flags the same way).
/// </summary>
public sealed class CheckpointSchedule
{
    private readonly Trainer _trainer;
    private readonly StopSignals? _signals;
    private readonly TextWriter _log;
    private readonly CheckpointStorage? _storage;

    /// <param name="trainer">This rank's trainer.</param>
    /// <param name="signals">The process's signals, or null for none.</param>
    /// <param name="log">Where rank 0 reports (others pass TextWriter.Null).</param>
    /// <param name="storage">Where files are created (tests).</param>
    public CheckpointSchedule(Trainer trainer, StopSignals? signals, TextWriter log, CheckpointStorage? storage = null)
    {
        _trainer = trainer;
        _signals = signals;
        _log = log;
        _storage = storage;
    }

    /// <summary>The signal that stopped the run (0: none).</summary>
    public int StoppedBy { get; private set; }

    /// <summary>The last completed save, if any.</summary>
    public SaveResult? LastSave { get; private set; }

    /// <summary>The process exit code: 0, or 128 + the signal that stopped the run.</summary>
    public int ExitCode => StoppedBy == 0 ? 0 : StopSignals.ExitCode(StoppedBy);

    /// <summary>The after-step hook for <see cref="Trainer.Run"/>.</summary>
    public void AfterStep(int step)
    {
        var c = _trainer.Settings.Checkpoint;
        int signal = AgreeOnSignal(_signals?.Received ?? 0);
        // A stop asked by the health checks (Health.StopOn) saves too: the run ends here.
        bool due = step == _trainer.Settings.Training.Steps || (c.Interval is int every && step % every == 0) || signal != 0 || _trainer.StopReason is not null;
        if (c.Save is string folder && due) LastSave = CheckpointWriter.Save(_trainer, folder, step, _log, _storage);
        if (signal == 0) return;
        StoppedBy = signal;
        _trainer.StopRequested = true;
        _log.WriteLine(c.Save is null
            ? $"stopped after step {step} ({StopSignals.Name(signal)}); nothing was saved (no --save)."
            : $"stopped after step {step} ({StopSignals.Name(signal)}); saved {LastSave!.Folder} — resume with --load {c.Save}.");
    }

    /// <summary>The largest signal number any rank has seen (collective over the world when it has more than one rank).</summary>
    private int AgreeOnSignal(int mine)
    {
        var world = _trainer.Rank.Groups.World;
        if (world.Size == 1) return mine;
        using var flag = torch.tensor(new long[] { mine }, device: world.DeviceForScalars);
        world.AllReduce(flag, Distributed.ReduceOp.Max);
        using var host = flag.cpu();
        return (int)host.item<long>();
    }
}
