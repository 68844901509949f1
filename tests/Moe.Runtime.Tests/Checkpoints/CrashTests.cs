using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using Moe.Runtime.Checkpoints;
using Xunit;

namespace Moe.Runtime.Tests.Checkpoints;

/// <summary>
/// Real <c>train</c> processes (TinyMixtral's entry point, one CPU thread), killed with SIGKILL at seeded moments —
/// one of them inside a save, which <c>MOE_CHECKPOINT_SLOW_SAVE_MS</c> stretches to several hundred milliseconds — and
/// stopped with SIGTERM: every time, <c>--load</c> of the save folder resumes after the last complete checkpoint (the
/// pointer's) and every logged step equals the uninterrupted run's exactly.
/// </summary>
[Collection("Console")]
public class CrashTests : IDisposable
{
    private const int SlowSaveMs = 150;
    private static readonly TimeSpan Patience = TimeSpan.FromMinutes(5);   // a deadline, not a speed goal: the machine may be loaded
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-crash-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string[] Args(string save, string metrics, params string[] more) =>
    [
        "train", "--seq-length", "32", "--global-batch-size", "4", "--micro-batch-size", "4", "--steps", "10",
        "--save", save, "--save-interval", "2", "--keep-last", "2", "--log-every", "1", "--metrics", metrics, .. more,
    ];

    /// <summary>Each metrics line's step and numbers; a last line cut short by a kill is left out.</summary>
    private static Dictionary<int, (double Loss, double LmLoss, double GradNorm)> Metrics(string path)
    {
        var result = new Dictionary<int, (double, double, double)>();
        if (!File.Exists(path)) return result;
        foreach (var line in File.ReadAllLines(path))
        {
            JsonElement r;
            try
            {
                r = JsonDocument.Parse(line).RootElement;
            }
            catch (JsonException)
            {
                continue;
            }
            result[r.GetProperty("step").GetInt32()] = (r.GetProperty("loss").GetDouble(), r.GetProperty("lm_loss").GetDouble(), r.GetProperty("grad_norm").GetDouble());
        }
        return result;
    }

    private static int Pointer(string save)
    {
        int latest = MoeCheckpoint.ReadPointer(save) ?? throw new Xunit.Sdk.XunitException($"{save} has no pointer");
        Assert.True(File.Exists(Path.Combine(save, MoeCheckpoint.IterationFolder(latest), "metadata.json")), $"the pointer names {latest}, which is not complete");
        return latest;
    }

    [Fact]
    public void KilledAnywhere_IncludingDuringASave_ResumesFromTheLastCompleteCheckpointWithExactLosses()
    {
        string reference = Path.Combine(_dir, "reference.jsonl");
        using (var run = Child.Start(Args(Path.Combine(_dir, "reference"), reference)))
            Assert.True(run.WaitForExit(Patience) == 0, run.Output);
        var expected = Metrics(reference);
        Assert.Equal(Enumerable.Range(1, 10), expected.Keys.Order());

        string save = Path.Combine(_dir, "save");
        var random = new Random(14);
        var logged = new List<(string Run, Dictionary<int, (double, double, double)> Steps)>();

        // 1. SIGKILL at a seeded moment after the first complete save.
        string m1 = Path.Combine(_dir, "m1.jsonl");
        using (var run = Child.Start(Args(save, m1), SlowSaveMs))
        {
            run.WaitFor(@"^saved .*iter_0000002 ", Patience);
            Thread.Sleep(random.Next(0, 600));
            run.Kill();
        }
        logged.Add(("run 1", Metrics(m1)));
        int latest = Pointer(save);

        // 2. Resume; SIGKILL inside the next save (its three phases each take SlowSaveMs).
        string m2 = Path.Combine(_dir, "m2.jsonl");
        using (var run = Child.Start(Args(save, m2, "--load", save), SlowSaveMs))
        {
            AssertResumedAfter(run, latest);
            string saving = run.WaitFor(@"^saving iteration (\d+) ", Patience);
            Thread.Sleep(random.Next(0, 3 * SlowSaveMs));
            run.Kill();
            string iteration = Regex.Match(saving, @"iteration (\d+)").Groups[1].Value;
            Assert.DoesNotMatch($@"saved .*iter_{int.Parse(iteration, CultureInfo.InvariantCulture):D7} ", run.Output);   // the kill landed inside the save
        }
        logged.Add(("run 2", Metrics(m2)));
        latest = Pointer(save);

        // 3. Resume; SIGTERM mid-run: the step finishes, is saved, and the process exits 143 saying where.
        string m3 = Path.Combine(_dir, "m3.jsonl");
        using (var run = Child.Start(Args(save, m3, "--load", save)))
        {
            AssertResumedAfter(run, latest);
            run.WaitFor(@"^step \d+/10 ", Patience);
            Thread.Sleep(random.Next(0, 300));
            run.Signal(15);
            Assert.Equal(143, run.WaitForExit(Patience));
            var stopped = Regex.Match(run.Output, @"stopped after step (\d+) \(SIGTERM\); saved (\S+) — resume with --load");
            Assert.True(stopped.Success, run.Output);
            int step = int.Parse(stopped.Groups[1].Value, CultureInfo.InvariantCulture);
            Assert.Equal(step, Pointer(save));
            latest = step;
        }
        logged.Add(("run 3", Metrics(m3)));

        // 4. Resume to the end.
        string m4 = Path.Combine(_dir, "m4.jsonl");
        using (var run = Child.Start(Args(save, m4, "--load", save)))
        {
            if (latest < 10) AssertResumedAfter(run, latest);
            Assert.True(run.WaitForExit(Patience) == 0, run.Output);
        }
        logged.Add(("run 4", Metrics(m4)));
        Assert.Equal(10, Pointer(save));

        foreach (var (name, steps) in logged)
            foreach (var (step, numbers) in steps)
                Assert.True(numbers == expected[step], $"{name}, step {step}: {numbers} instead of the uninterrupted {expected[step]}");
        Assert.Equal(Enumerable.Range(1, 10), logged.SelectMany(l => l.Steps.Keys).Distinct().Order());
        Assert.Empty(Directory.GetDirectories(save, ".*"));
    }

    private static void AssertResumedAfter(Child run, int latest)
    {
        string line = run.WaitFor(@"^resumed from ", Patience);
        Assert.Contains($"{MoeCheckpoint.IterationFolder(latest)}: iteration {latest} done", line);
        Assert.Contains($"continuing at step {latest + 1} of 10", line);
    }

    [Fact]
    public void SecondSignal_StopsAtOnceInsideTheSave_AndThePointerNeverMoves()
    {
        string save = Path.Combine(_dir, "twice");
        using var run = Child.Start(Args(save, Path.Combine(_dir, "twice.jsonl")), slowSaveMs: 5000);
        run.WaitFor(@"^step 2/10 ", Patience);
        run.Signal(15);
        // Two SIGTERMs sent before the first is handled coalesce into one (POSIX signals are not queued): send the
        // second only once the first is acknowledged, during a save that starts after it.
        run.WaitFor(@"^SIGTERM: finishing the current step", Patience);
        // A save already under way (the interval's, slowed to 5 s) may be the last one; otherwise the stop's save follows.
        string output = run.Output;
        int saving = output.LastIndexOf("saving iteration ", StringComparison.Ordinal);
        if (saving < 0 || output.IndexOf("\nsaved ", saving, StringComparison.Ordinal) >= 0)
            run.WaitFor(@"^saving iteration ", Patience);
        run.Signal(15);
        Assert.Equal(143, run.WaitForExit(Patience));
        Assert.Contains("SIGTERM again: stopping now", run.Output);
        Assert.DoesNotContain("stopped after step", run.Output);
        // Saves at steps 2 (the interval) and at the signal's step: whichever the second signal interrupted never became latest.
        string? pointer = File.Exists(Path.Combine(save, MoeCheckpoint.PointerFile)) ? File.ReadAllText(Path.Combine(save, MoeCheckpoint.PointerFile)) : null;
        foreach (var match in Regex.Matches(run.Output, @"^saving iteration (\d+) ", RegexOptions.Multiline).Cast<Match>().TakeLast(1))
            Assert.NotEqual(match.Groups[1].Value, pointer);
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int kill(int pid, int signal);

    /// <summary>A child <c>train</c> process whose output lines can be waited for.</summary>
    private sealed class Child : IDisposable
    {
        private readonly Process _process;
        private readonly BlockingCollection<string> _lines = new();
        private readonly StringBuilder _output = new();

        private Child(Process process) => _process = process;

        public string Output
        {
            get
            {
                lock (_output) return _output.ToString();
            }
        }

        public static Child Start(string[] args, int slowSaveMs = 0)
        {
            var info = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
            {
                WorkingDirectory = AppContext.BaseDirectory,
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                UseShellExecute = false,
            };
            info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "TinyMixtral.dll"));
            foreach (var a in args) info.ArgumentList.Add(a);
            info.Environment["OMP_NUM_THREADS"] = "1";
            info.Environment[CheckpointWriter.SlowSaveVariable] = slowSaveMs.ToString(CultureInfo.InvariantCulture);
            var child = new Child(new Process { StartInfo = info });
            DataReceivedEventHandler collect = (_, e) =>
            {
                if (e.Data is null) return;
                lock (child._output) child._output.AppendLine(e.Data);
                child._lines.Add(e.Data);
            };
            child._process.OutputDataReceived += collect;
            child._process.ErrorDataReceived += collect;
            child._process.Start();
            child._process.BeginOutputReadLine();
            child._process.BeginErrorReadLine();
            return child;
        }

        /// <summary>The first line from now on matching <paramref name="pattern"/>; fails with the output if the process ends or the deadline passes first.</summary>
        public string WaitFor(string pattern, TimeSpan deadline)
        {
            var regex = new Regex(pattern);
            var watch = Stopwatch.StartNew();
            while (watch.Elapsed < deadline)
            {
                if (_lines.TryTake(out var line, TimeSpan.FromMilliseconds(100)))
                {
                    if (regex.IsMatch(line)) return line;
                }
                else if (_process.HasExited && _lines.Count == 0)
                {
                    _process.WaitForExit();
                    if (_lines.Count == 0) break;
                }
            }
            throw new Xunit.Sdk.XunitException($"no line matching /{pattern}/ (process {(_process.HasExited ? $"exited with {_process.ExitCode}" : "still running")}):\n{Output}");
        }

        public void Kill()
        {
            _process.Kill();   // SIGKILL
            _process.WaitForExit();
        }

        public void Signal(int signal) => Assert.Equal(0, kill(_process.Id, signal));

        public int WaitForExit(TimeSpan deadline)
        {
            if (!_process.WaitForExit(deadline))
            {
                _process.Kill();
                throw new Xunit.Sdk.XunitException($"the process did not exit within {deadline}:\n{Output}");
            }
            _process.WaitForExit();
            return _process.ExitCode;
        }

        public void Dispose()
        {
            if (!_process.HasExited) _process.Kill();
            _process.Dispose();
            _lines.Dispose();
        }
    }
}
