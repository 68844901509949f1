using Moe.Dsl.Layout;
using Moe.Runtime.Devices;
using Moe.Runtime.Distributed.Nccl;
using Moe.Runtime.Distributed.Rendezvous;
using static TorchSharp.torch;

namespace Moe.Runtime.Distributed.Launch;

/// <summary>
/// One launched rank's way into the job: its GPU, the bootstrap store (rank 0 hosts Moe's authenticated server,
/// or torchrun's agent store is used), the NCCL unique id handed from rank 0 to every rank through it, the world
/// communicator, and the process groups split from it. Disposing ends it in order: the groups, NCCL, the store,
/// and — on rank 0, after every rank has passed the closing barrier — the server.
/// </summary>
public sealed class RankBootstrap : IDisposable
{
    private readonly RendezvousServer? _server;
    private readonly IRendezvousStore _store;
    private readonly NcclSession _nccl;
    private readonly Thread _abortWatch;
    private readonly TimeSpan _timeout;
    private volatile bool _closing;

    private RankBootstrap(LaunchEnvironment launch, RendezvousServer? server, IRendezvousStore store, NcclSession nccl, ProcessGroups groups, TimeSpan timeout)
    {
        Launch = launch;
        _server = server;
        _store = store;
        _nccl = nccl;
        Groups = groups;
        _timeout = timeout;
        // Another rank's failure reaches this one through the store's abort flag, well before any deadline.
        _abortWatch = new Thread(WatchAbort) { IsBackground = true, Name = "abort watch" };
        _abortWatch.Start();
    }

    public LaunchEnvironment Launch { get; }

    /// <summary>This rank's process groups.</summary>
    public ProcessGroups Groups { get; }

    /// <summary>"NCCL 2.28.9 (path)".</summary>
    public string NcclDescription => _nccl.Describe();

    /// <summary>
    /// Makes this process's GPU the only one it sees, before CUDA is first used: the local rank's device
    /// (an entry of CUDA_VISIBLE_DEVICES when the launcher set several; kept when it set one, as Slurm's
    /// --gpus-per-task does). Every rank then works on cuda:0.
    /// </summary>
    public static string SelectDevice(LaunchEnvironment launch)
    {
        string? visible = Environment.GetEnvironmentVariable("CUDA_VISIBLE_DEVICES");
        var entries = visible?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) ?? [];
        string mine = entries.Length switch
        {
            1 => entries[0],
            > 1 => launch.LocalRank < entries.Length ? entries[launch.LocalRank]
                : throw new UserError($"Local rank {launch.LocalRank} has no GPU: CUDA_VISIBLE_DEVICES lists {entries.Length} ({visible}); start at most {entries.Length} ranks on this node."),
            _ => launch.LocalRank.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        NativeEnvironment.Set("CUDA_VISIBLE_DEVICES", mine);
        return mine;
    }

    /// <summary>Joins the job: store, NCCL id, world communicator, groups of <paramref name="layout"/>. Collective over every rank.</summary>
    public static RankBootstrap Join(LaunchEnvironment launch, IRankLayout layout, Device device, TimeSpan timeout, TextWriter log)
    {
        if (launch.WorldSize != layout.World)
            throw new UserError($"The launcher started {launch.WorldSize} ranks but the layout is for {layout.World} GPUs (Parallelism.Gpus); pass --gpus {launch.WorldSize} or start {layout.World} ranks.");
        RendezvousServer? server = null;
        IRendezvousStore? store = null;
        NcclSession? nccl = null;
        try
        {
            Func<string, string?> env = Environment.GetEnvironmentVariable;
            var secret = RendezvousSecret.Resolve(env, launch.Rank == 0 ? log : TextWriter.Null);
            if (launch.AgentStore)
            {
                store = TcpStoreClient.ConnectToTorchrunAgent(env, secret, timeout);
            }
            else
            {
                if (secret is null) throw new UserError(RendezvousSecret.MissingMessage);
                if (launch.Rank == 0)
                    server = RendezvousServer.Start(RendezvousServer.BindAddressFor(launch.MasterAddress), launch.MasterPort, launch.WorldSize, secret, log);
                store = RendezvousClient.Connect(launch.MasterAddress, launch.MasterPort, launch.Rank, launch.WorldSize, secret, timeout);
            }
            var rendezvous = store;
            nccl = NcclSession.Start(timeout, device, log, reason => rendezvous.RaiseAbort(launch.Rank, reason));
            var id = new byte[NcclUniqueId.Size];
            if (launch.Rank == 0)
            {
                id = nccl.NewUniqueId();
                NcclUniqueId.FromBytes(id).PublishTo(store);
            }
            else
            {
                NcclUniqueId.ReadFrom(store, timeout).CopyTo(id);
            }
            var world = nccl.World(id, launch.Rank, launch.WorldSize);
            Array.Clear(id);
            var groups = ProcessGroups.Create(world, layout);
            store.Barrier("moe/start", launch.WorldSize, timeout);
            return new RankBootstrap(launch, server, store, nccl, groups, timeout);
        }
        catch (Exception e)
        {
            try { store?.RaiseAbort(launch.Rank, e.Message); } catch (Exception) { }
            nccl?.Dispose();
            store?.Dispose();
            server?.Dispose();
            throw;
        }
    }

    /// <summary>Tells the other ranks this one failed (they stop at once instead of at their deadline).</summary>
    public void RaiseAbort(string reason)
    {
        try { _store.RaiseAbort(Launch.Rank, reason); } catch (Exception) { }
    }

    private void WatchAbort()
    {
        while (!_closing)
        {
            Thread.Sleep(500);
            if (!_closing && _store.TryGetAbort(out string reason))
            {
                if (_closing) return;
                _nccl.Abort($"the job was aborted: {reason}");
            }
        }
    }

    /// <summary>Waits for every rank at the end, then tears down (rank 0's server last).</summary>
    public void Dispose()
    {
        try { _store.Barrier("moe/end", Launch.WorldSize, _timeout); }
        finally
        {
            _closing = true;
            _abortWatch.Join(TimeSpan.FromSeconds(2));
            Groups.Dispose();
            Groups.World.Dispose();
            _nccl.Dispose();
            _store.Dispose();
            _server?.Dispose();
        }
    }
}

/// <summary>The C library's environment, which native code (CUDA, NCCL, libtorch) reads; .NET keeps its own copy on Unix.</summary>
public static partial class NativeEnvironment
{
    /// <summary>Sets <paramref name="name"/> in both environments.</summary>
    public static void Set(string name, string value)
    {
        Environment.SetEnvironmentVariable(name, value);
        if (!OperatingSystem.IsWindows() && SetEnv(name, value, 1) != 0)
            throw new InvalidOperationException($"setenv({name}) failed with errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()}.");
    }

    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "setenv", StringMarshalling = System.Runtime.InteropServices.StringMarshalling.Utf8, SetLastError = true)]
    private static partial int SetEnv(string name, string value, int overwrite);
}
