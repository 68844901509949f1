using System.Globalization;
using System.Net;
using System.Net.Sockets;
using Moe.Runtime.Distributed.Rendezvous;

namespace Moe.Runtime.Distributed.Launch;

/// <summary>
/// <c>train</c>'s own launcher for one node: starts one process per GPU — this same program with the same
/// arguments — with torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
/// MASTER_PORT), a fresh rendezvous secret and the recipe's NCCL settings, then supervises them
/// (<see cref="ProcessSupervisor"/>): each rank logs to rank-N.log in the run directory, rank 0's output is
/// echoed, and one failing rank stops the others and names itself.
/// </summary>
public static class NodeLauncher
{
    /// <summary>Starts <paramref name="ranks"/> processes and waits for them; returns the job's exit code.</summary>
    /// <param name="ranks">Processes (GPUs) to start.</param>
    /// <param name="runDirectory">Where the per-rank logs go.</param>
    /// <param name="extraEnvironment">The recipe's NCCL settings and anything else the ranks need.</param>
    /// <param name="console">Where rank 0's output and the launcher's lines go.</param>
    /// <param name="passRunDirectory">Also pass the directory to every rank as --run-dir, so they agree on it (train).</param>
    public static SupervisedResult Run(int ranks, string runDirectory, IReadOnlyList<KeyValuePair<string, string>> extraEnvironment, TextWriter console, bool passRunDirectory = true)
    {
        var (program, arguments) = ThisProgram();
        if (passRunDirectory) arguments = WithRunDirectory(arguments, runDirectory);
        int port = FreePort();
        var secret = RendezvousSecret.Generate();
        var processes = Enumerable.Range(0, ranks).Select(rank =>
        {
            var env = new Dictionary<string, string>(StringComparer.Ordinal)
            {
                ["RANK"] = Text(rank),
                ["LOCAL_RANK"] = Text(rank),
                ["WORLD_SIZE"] = Text(ranks),
                ["LOCAL_WORLD_SIZE"] = Text(ranks),
                ["MASTER_ADDR"] = "127.0.0.1",
                ["MASTER_PORT"] = Text(port),
                [LaunchEnvironment.MoeLauncherVariable] = "1",
                [RendezvousSecret.EnvironmentVariable] = secret.ToEnvironmentValue(),
            };
            foreach (var (k, v) in extraEnvironment) env[k] = v;
            return new RankProcess(rank, program, arguments, env, Path.Combine(runDirectory, $"rank-{rank}.log"));
        }).ToList();
        console.WriteLine($"moe: starting {ranks} ranks on this node (rendezvous 127.0.0.1:{port}); logs in {runDirectory}/rank-N.log");
        return new ProcessSupervisor(console, TimeSpan.FromSeconds(30)).Run(processes);
    }

    /// <summary>This program and its arguments as the OS started it (an app host, or `dotnet app.dll`).</summary>
    private static (string Program, IReadOnlyList<string> Arguments) ThisProgram()
    {
        string program = Environment.ProcessPath ?? throw new UserError("Cannot tell which program is running, so the ranks cannot be started; launch them with torchrun --no-python instead.");
        var args = Environment.GetCommandLineArgs();
        bool host = Path.GetFileNameWithoutExtension(program) == "dotnet";
        return (program, host ? args : args[1..]);
    }

    /// <summary>The arguments with --run-dir set to <paramref name="directory"/> (replacing a value given on the command line).</summary>
    private static IReadOnlyList<string> WithRunDirectory(IReadOnlyList<string> args, string directory)
    {
        var result = new List<string>();
        for (int i = 0; i < args.Count; i++)
        {
            if (args[i] == "--run-dir") { i++; continue; }
            if (args[i].StartsWith("--run-dir=", StringComparison.Ordinal)) continue;
            result.Add(args[i]);
        }
        result.Add("--run-dir");
        result.Add(directory);
        return result;
    }

    private static int FreePort()
    {
        using var probe = new TcpListener(IPAddress.Loopback, 0);
        probe.Start();
        return ((IPEndPoint)probe.LocalEndpoint).Port;
    }

    private static string Text(int value) => value.ToString(CultureInfo.InvariantCulture);
}
