using System.Diagnostics;
using Moe.Runtime.Distributed.Launch;
using Xunit;

namespace Moe.Runtime.Tests.Distributed;

public class LaunchEnvironmentTests
{
    private static Func<string, string?> Env(params (string Key, string Value)[] vars)
    {
        var d = vars.ToDictionary(v => v.Key, v => v.Value);
        return k => d.TryGetValue(k, out var v) ? v : null;
    }

    [Fact]
    public void NothingSet_MeansTrainLaunchesTheRanksItself() => Assert.Null(LaunchEnvironment.Detect(Env()));

    [Fact]
    public void Torchrun_VariablesAndAgentStore()
    {
        var e = LaunchEnvironment.Detect(Env(("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.5"), ("MASTER_PORT", "29400"), ("TORCHELASTIC_RUN_ID", "abc"), ("TORCHELASTIC_RESTART_COUNT", "2"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True")))!;
        Assert.Equal(new LaunchEnvironment(Launcher.Torchrun, 3, 8, 1, 2, "10.0.0.5", 29400, AgentStore: true, RestartCount: 2), e);
    }

    [Fact]
    public void Slurm_RankWorldLocalRankAndTheFirstHostOfTheNodeList()
    {
        var e = LaunchEnvironment.Detect(Env(("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "1"), ("SLURM_JOB_NODELIST", "gpu[07-09,12],login1")))!;
        Assert.Equal(Launcher.Slurm, e.Launcher);
        Assert.Equal((5, 16, 1, "gpu07", 29500), (e.Rank, e.WorldSize, e.LocalRank, e.MasterAddress, e.MasterPort));
    }

    [Fact]
    public void RankBeatsSlurmProcid_AsMegatronReadsThem()
    {
        var e = LaunchEnvironment.Detect(Env(("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")))!;
        Assert.Equal((Launcher.Environment, 1, 2), (e.Launcher, e.Rank, e.WorldSize));
    }

    [Theory]
    [InlineData("node01", "node01")]
    [InlineData("node[1-4]", "node1")]
    [InlineData("a100-[003,007-009]", "a100-003")]
    [InlineData("x,y", "x")]
    public void FirstHost_ExpandsTheFirstEntry(string list, string expected) => Assert.Equal(expected, LaunchEnvironment.FirstHost(list));

    [Theory]
    [InlineData("RANK", "2", "WORLD_SIZE", "2", "rank 2 of a world of 2")]
    [InlineData("RANK", "x", "WORLD_SIZE", "2", "RANK=x is not an integer")]
    [InlineData("RANK", "0", "MASTER_PORT", "70000", "Only one of RANK (0) and WORLD_SIZE (unset)")]
    public void BadValues_AreNamed(string k1, string v1, string k2, string v2, string message)
    {
        var e = Assert.Throws<UserError>(() => LaunchEnvironment.Detect(Env((k1, v1), (k2, v2), ("MASTER_ADDR", "h"))));
        Assert.Contains(message, e.Message);
    }
}

public class ProcessSupervisorTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-launch-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private RankProcess Shell(int rank, string script) =>
        new(rank, "/bin/sh", ["-c", script], new Dictionary<string, string> { ["MOE_TEST_RANK"] = rank.ToString(System.Globalization.CultureInfo.InvariantCulture) },
            Path.Combine(_dir, $"rank-{rank}.log"));

    [Fact]
    public void AllRanksSucceed_ExitCodeZeroAndEachLogHoldsItsOutput()
    {
        var console = new StringWriter();
        var result = new ProcessSupervisor(console, TimeSpan.FromSeconds(2)).Run([Shell(0, "echo zero $MOE_TEST_RANK"), Shell(1, "echo one >&2")]);
        Assert.Equal(0, result.ExitCode);
        Assert.Null(result.FailedRank);
        Assert.Equal("zero 0", File.ReadAllText(Path.Combine(_dir, "rank-0.log")).Trim());
        Assert.Equal("one", File.ReadAllText(Path.Combine(_dir, "rank-1.log")).Trim());
        Assert.Contains("zero 0", console.ToString());      // rank 0 is echoed
        Assert.DoesNotContain("one", console.ToString());    // the others are not
    }

    [Fact]
    public void OneRankFails_TheOthersAreStoppedAndTheFailureIsNamed()
    {
        // Rank 2 ignores SIGTERM: it must be killed after the 1 s grace period, not waited for.
        var watch = Stopwatch.StartNew();
        var result = new ProcessSupervisor(new StringWriter(), TimeSpan.FromSeconds(1)).Run(
            [Shell(0, "exec sleep 60"), Shell(1, "echo 'bad things happened' >&2; sleep 0.3; exit 7"), Shell(2, "trap '' TERM; exec sleep 60")]);
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(20), $"took {watch.Elapsed.TotalSeconds:F1} s");
        Assert.Equal(7, result.ExitCode);
        Assert.Equal(1, result.FailedRank);
        Assert.Contains("rank 1 exited with code 7", result.Message);
        Assert.Contains(Path.Combine(_dir, "rank-1.log"), result.Message);
        Assert.Contains("bad things happened", result.Message);
    }
}
