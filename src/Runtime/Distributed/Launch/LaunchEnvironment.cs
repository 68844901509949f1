using System.Globalization;
using System.Text.RegularExpressions;

namespace Moe.Runtime.Distributed.Launch;

/// <summary>Who started this process.</summary>
public enum Launcher
{
    /// <summary>Moe's own launcher (<c>train</c> starting one process per GPU on this node).</summary>
    Moe,

    /// <summary><c>torchrun --no-python</c>: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, and torchrun's agent store at that address.</summary>
    Torchrun,

    /// <summary>Slurm's <c>srun</c>: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST.</summary>
    Slurm,

    /// <summary>RANK and WORLD_SIZE set by hand (or by another launcher following torchrun's conventions).</summary>
    Environment,
}

/// <summary>
/// This process's place in a job, read from the launcher's environment: torchrun's variables first (as
/// Megatron reads RANK before SLURM_PROCID and WORLD_SIZE before SLURM_NTASKS, _rank_utils.py), then Slurm's.
/// Null from <see cref="Detect"/> when nothing launched it, i.e. <c>train</c> must launch the ranks itself.
/// </summary>
/// <param name="Launcher">Who started it.</param>
/// <param name="Rank">Global rank.</param>
/// <param name="WorldSize">Ranks in the job.</param>
/// <param name="LocalRank">Rank on this node (which GPU it takes).</param>
/// <param name="LocalWorldSize">Ranks on this node, when known.</param>
/// <param name="MasterAddress">Where rank 0 (or torchrun's agent) serves the bootstrap.</param>
/// <param name="MasterPort">Its port.</param>
/// <param name="AgentStore">True under torchrun with TORCHELASTIC_USE_AGENT_STORE: the bootstrap is torchrun's own store.</param>
/// <param name="RestartCount">torchrun's TORCHELASTIC_RESTART_COUNT (its store keys are per attempt).</param>
public sealed record LaunchEnvironment(Launcher Launcher, int Rank, int WorldSize, int LocalRank, int? LocalWorldSize,
    string MasterAddress, int MasterPort, bool AgentStore, int RestartCount)
{
    /// <summary>Set by Moe's launcher in every child it starts.</summary>
    public const string MoeLauncherVariable = "MOE_LAUNCHER";

    /// <summary>The port used when neither MASTER_PORT nor anything else names one (torchrun's default).</summary>
    public const int DefaultPort = 29500;

    /// <summary>Reads the launcher's variables from <paramref name="env"/> (default: this process's environment); null when none are set.</summary>
    public static LaunchEnvironment? Detect(Func<string, string?>? env = null)
    {
        env ??= System.Environment.GetEnvironmentVariable;
        string? rank = env("RANK"), world = env("WORLD_SIZE");
        if (rank is not null || world is not null)
        {
            if (rank is null || world is null)
                throw new UserError($"Only one of RANK ({rank ?? "unset"}) and WORLD_SIZE ({world ?? "unset"}) is set; a launcher sets both (torchrun does), or neither when `train` should start the ranks itself.");
            int r = Int("RANK", rank), w = Int("WORLD_SIZE", world);
            var launcher = env(MoeLauncherVariable) == "1" ? Launcher.Moe
                : env("TORCHELASTIC_RUN_ID") is not null || env("TORCHELASTIC_RESTART_COUNT") is not null ? Launcher.Torchrun
                : Launcher.Environment;
            string address = env("MASTER_ADDR") ?? throw new UserError($"RANK and WORLD_SIZE are set but MASTER_ADDR is not: set MASTER_ADDR to the host of rank 0 (and MASTER_PORT, default {DefaultPort}).");
            int port = env("MASTER_PORT") is string p ? Port(p) : DefaultPort;
            return Checked(new LaunchEnvironment(launcher, r, w, env("LOCAL_RANK") is string lr ? Int("LOCAL_RANK", lr) : r,
                env("LOCAL_WORLD_SIZE") is string lw ? Int("LOCAL_WORLD_SIZE", lw) : null, address, port,
                launcher == Launcher.Torchrun && string.Equals(env("TORCHELASTIC_USE_AGENT_STORE"), "True", StringComparison.OrdinalIgnoreCase),
                env("TORCHELASTIC_RESTART_COUNT") is string rc ? Int("TORCHELASTIC_RESTART_COUNT", rc) : 0));
        }
        if (env("SLURM_PROCID") is string procid)
        {
            int r = Int("SLURM_PROCID", procid);
            int w = Int("SLURM_NTASKS", env("SLURM_NTASKS") ?? throw new UserError("SLURM_PROCID is set but SLURM_NTASKS is not; start the job with srun."));
            string? nodes = env("SLURM_JOB_NODELIST") ?? env("SLURM_NODELIST");
            string address = env("MASTER_ADDR") ?? (nodes is null
                ? throw new UserError("Under Slurm, MASTER_ADDR or SLURM_JOB_NODELIST must name rank 0's host.")
                : FirstHost(nodes));
            int port = env("MASTER_PORT") is string p ? Port(p) : DefaultPort;
            return Checked(new LaunchEnvironment(Launcher.Slurm, r, w, env("SLURM_LOCALID") is string l ? Int("SLURM_LOCALID", l) : 0,
                env("SLURM_NTASKS_PER_NODE") is string n && int.TryParse(n, NumberStyles.Integer, CultureInfo.InvariantCulture, out int per) ? per : null,
                address, port, AgentStore: false, RestartCount: 0));
        }
        return null;
    }

    private static LaunchEnvironment Checked(LaunchEnvironment e)
    {
        if (e.WorldSize < 1 || e.Rank < 0 || e.Rank >= e.WorldSize)
            throw new UserError($"The launcher gave rank {e.Rank} of a world of {e.WorldSize}; a rank must be in [0, world size).");
        if (e.LocalRank < 0) throw new UserError($"The launcher gave local rank {e.LocalRank}; it must not be negative.");
        return e;
    }

    /// <summary>
    /// The first host of a Slurm node list: "node[07-09,12],gpu3" → "node07" (a bracket's first range's first
    /// number, zero padding kept), as scontrol show hostnames would list first.
    /// </summary>
    public static string FirstHost(string nodeList)
    {
        var m = Regex.Match(nodeList.Trim(), @"^([^,\[]+)(?:\[([0-9]+)[^\]]*\])?");
        if (!m.Success || m.Groups[1].Value.Length == 0)
            throw new UserError($"SLURM_JOB_NODELIST \"{nodeList}\" is not a Slurm host list; set MASTER_ADDR to rank 0's host.");
        return m.Groups[1].Value + (m.Groups[2].Success ? m.Groups[2].Value : "");
    }

    private static int Int(string name, string text) =>
        int.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) ? v
        : throw new UserError($"{name}={text} is not an integer.");

    private static int Port(string text) =>
        int.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) && v is > 0 and < 65536 ? v
        : throw new UserError($"MASTER_PORT={text} is not a TCP port (1–65535).");
}
