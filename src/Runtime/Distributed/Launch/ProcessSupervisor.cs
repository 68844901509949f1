using System.Diagnostics;

namespace Moe.Runtime.Distributed.Launch;

/// <summary>One process to start: its rank, command line, extra environment and log file.</summary>
/// <param name="Rank">The global rank it runs.</param>
/// <param name="FileName">The executable.</param>
/// <param name="Arguments">Its arguments.</param>
/// <param name="Environment">Variables added to (or replacing) the launcher's environment.</param>
/// <param name="LogPath">Where its stdout and stderr go, interleaved as they arrive.</param>
public sealed record RankProcess(int Rank, string FileName, IReadOnlyList<string> Arguments, IReadOnlyDictionary<string, string> Environment, string LogPath);

/// <summary>How a supervised job ended.</summary>
/// <param name="ExitCode">0 when every rank exited with 0; otherwise the first failing rank's code.</param>
/// <param name="FailedRank">The first rank that failed, or null.</param>
/// <param name="Message">What happened, naming the failing rank, its exit code and its log (with its last lines).</param>
public sealed record SupervisedResult(int ExitCode, int? FailedRank, string Message);

/// <summary>
/// Starts one process per rank and watches them as torchrun's agent does: each rank's output goes to its own
/// log file (rank 0's is also echoed to the console), and when any rank exits with a non-zero code the others
/// are stopped — asked with SIGTERM, killed after a grace period — so one failing rank never leaves the
/// others hanging in a collective. The result names the first rank that failed and its log.
/// </summary>
public sealed class ProcessSupervisor
{
    private readonly TextWriter _console;
    private readonly TimeSpan _grace;

    /// <param name="console">Where rank 0's output is echoed and the launcher's own lines go.</param>
    /// <param name="grace">How long stopped ranks get between SIGTERM and SIGKILL.</param>
    public ProcessSupervisor(TextWriter console, TimeSpan grace)
    {
        _console = console;
        _grace = grace;
    }

    /// <summary>Runs every rank to its end (or until one fails) and says how the job ended.</summary>
    public SupervisedResult Run(IReadOnlyList<RankProcess> ranks)
    {
        var processes = new Process?[ranks.Count];
        var logs = new StreamWriter?[ranks.Count];
        using var exited = new System.Collections.Concurrent.BlockingCollection<int>();   // indices, in the order the processes exit
        try
        {
            for (int i = 0; i < ranks.Count; i++)
            {
                var r = ranks[i];
                Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(r.LogPath))!);
                var log = logs[i] = new StreamWriter(new FileStream(r.LogPath, FileMode.Create, FileAccess.Write, FileShare.Read)) { AutoFlush = true };
                var psi = new ProcessStartInfo(r.FileName)
                {
                    RedirectStandardOutput = true,
                    RedirectStandardError = true,
                    UseShellExecute = false,
                };
                foreach (var a in r.Arguments) psi.ArgumentList.Add(a);
                foreach (var (k, v) in r.Environment) psi.Environment[k] = v;
                var p = new Process { StartInfo = psi, EnableRaisingEvents = true };
                bool echo = r.Rank == 0;
                void Line(string? line)
                {
                    if (line is null) return;
                    lock (log) log.WriteLine(line);
                    if (echo) lock (_console) _console.WriteLine(line);
                }
                p.OutputDataReceived += (_, e) => Line(e.Data);
                p.ErrorDataReceived += (_, e) => Line(e.Data);
                int index = i;
                p.Exited += (_, _) => exited.Add(index);
                if (!p.Start()) throw new UserError($"Could not start rank {r.Rank}: {r.FileName}.");
                processes[i] = p;
                p.BeginOutputReadLine();
                p.BeginErrorReadLine();
            }

            int remaining = ranks.Count;
            SupervisedResult? failure = null;
            while (remaining > 0)
            {
                int i = exited.Take();
                remaining--;
                var p = processes[i]!;
                // Drains the redirected output (WaitForExitAsync waits for it); bounded, since a child the rank
                // started could hold the pipe open after the rank itself has gone.
                using (var drained = new CancellationTokenSource(TimeSpan.FromSeconds(5)))
                {
                    try { p.WaitForExitAsync(drained.Token).GetAwaiter().GetResult(); }
                    catch (OperationCanceledException) { }
                }
                if (p.ExitCode != 0 && failure is null)
                {
                    failure = Failure(ranks[i], p.ExitCode);
                    _console.WriteLine($"moe: {failure.Message}");
                    Stop(processes, ranks, except: i);
                }
            }
            return failure ?? new SupervisedResult(0, null, $"all {ranks.Count} ranks finished");
        }
        finally
        {
            foreach (var p in processes)
            {
                if (p is null) continue;
                if (!p.HasExited) Kill(p);
                p.Dispose();
            }
            foreach (var l in logs) l?.Dispose();
        }
    }

    /// <summary>SIGTERM to every rank still running, then SIGKILL to those still running after the grace period.</summary>
    private void Stop(Process?[] processes, IReadOnlyList<RankProcess> ranks, int except)
    {
        var running = processes.Select((p, i) => (p, i)).Where(x => x.i != except && x.p is { HasExited: false }).ToList();
        if (running.Count == 0) return;
        _console.WriteLine($"moe: stopping the other ranks ({string.Join(", ", running.Select(x => ranks[x.i].Rank))}).");
        foreach (var (p, _) in running) Signal(p!.Id, 15);
        var deadline = Stopwatch.StartNew();
        foreach (var (p, _) in running)
        {
            var left = _grace - deadline.Elapsed;
            if (left < TimeSpan.Zero || !p!.WaitForExit(left)) Kill(p!);
        }
    }

    private static void Kill(Process p)
    {
        try { p.Kill(entireProcessTree: true); }
        catch (InvalidOperationException) { }   // it exited meanwhile
    }

    private static void Signal(int pid, int signal)
    {
        if (OperatingSystem.IsWindows()) return;
        _ = Kill(pid, signal);
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static extern int Kill(int pid, int signal);

    private static SupervisedResult Failure(RankProcess r, int code)
    {
        string[] tail = [];
        try
        {
            using var stream = new FileStream(r.LogPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            using var reader = new StreamReader(stream);
            tail = reader.ReadToEnd().Split('\n', StringSplitOptions.RemoveEmptyEntries).TakeLast(8).ToArray();
        }
        catch (IOException) { }
        string how = code > 128 && code < 160 ? $"was killed by signal {code - 128}" : code < 0 ? $"was killed by signal {-code}" : $"exited with code {code}";
        string last = tail.Length == 0 ? " (its log is empty)" : ":" + Environment.NewLine + string.Join(Environment.NewLine, tail.Select(l => "  | " + l));
        return new SupervisedResult(code == 0 ? 1 : code, r.Rank, $"rank {r.Rank} {how}; its log is {r.LogPath}{last}");
    }
}
