using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using Moe.Runtime.Distributed.Rendezvous;
using static Moe.Runtime.Distributed.Rendezvous.RendezvousProtocol;

namespace Moe.Rendezvous.Tests;

/// <summary>The server's log, kept line by line; tests wait (bounded) for the lines they expect.</summary>
internal sealed class LogCapture : TextWriter
{
    private readonly List<string> _lines = [];
    private readonly System.Text.StringBuilder _current = new();

    public override System.Text.Encoding Encoding => System.Text.Encoding.UTF8;

    public override void Write(char value)
    {
        lock (_lines)
        {
            if (value == '\n') { _lines.Add(_current.ToString()); _current.Clear(); }
            else _current.Append(value);
        }
    }

    public string[] Lines { get { lock (_lines) return [.. _lines]; } }

    /// <summary>Waits until <paramref name="count"/> lines match, or fails with the log after <paramref name="timeout"/>.</summary>
    public string[] WaitFor(Func<string, bool> match, int count, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            string[] found = Lines.Where(match).ToArray();
            if (found.Length >= count) return found;
            if (clock.Elapsed > timeout)
                Assert.Fail($"expected {count} matching log lines within {timeout}, found {found.Length}; the log:\n{string.Join("\n", Lines.TakeLast(40))}");
            Thread.Sleep(20);
        }
    }

    public string WaitForOne(Func<string, bool> match, TimeSpan timeout) => WaitFor(match, 1, timeout)[0];
}

/// <summary>
/// A raw TCP peer that speaks the rendezvous framing by hand, so that tests can send what no
/// <see cref="RendezvousClient"/> would: bad lengths, other ranks, mutated requests.
/// </summary>
internal sealed class RawPeer : IDisposable
{
    public Socket Socket { get; }

    /// <summary>"127.0.0.1:54321": how the server's log names this peer.</summary>
    public string Name { get; }

    public FrameCipher? Sealer { get; private set; }
    public FrameCipher? Opener { get; private set; }

    private RawPeer(Socket socket)
    {
        Socket = socket;
        Name = socket.LocalEndPoint!.ToString()!;
    }

    public static RawPeer Connect(int port)
    {
        var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        socket.Connect(IPAddress.Loopback, port);
        return new RawPeer(socket);
    }

    public void SendRaw(ReadOnlySpan<byte> bytes) => Socket.Send(bytes);

    public void SendFrame(ReadOnlySpan<byte> body)
    {
        byte[] header = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(header, (uint)body.Length);
        SendRaw([.. header, .. body]);
    }

    /// <summary>The next frame's body, or null when the server closed the connection (or reset it) first.</summary>
    public byte[]? ReadFrame(TimeSpan timeout)
    {
        Socket.ReceiveTimeout = (int)timeout.TotalMilliseconds;
        try
        {
            return RendezvousClient.ReadFrame(Socket, MaxSealedFrame);
        }
        catch (EndOfStreamException) { return null; }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.ConnectionReset) { return null; }
    }

    /// <summary>True once the server has closed the connection (reads EOF or a reset within the timeout).</summary>
    public bool ClosedByServer(TimeSpan timeout)
    {
        Socket.ReceiveTimeout = (int)timeout.TotalMilliseconds;
        byte[] buffer = new byte[256];
        try
        {
            while (true)
                if (Socket.Receive(buffer) == 0) return true;
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.ConnectionReset) { return true; }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock) { return false; }
    }

    /// <summary>Runs the client's side of the handshake with any rank and world size; returns the server's last message body.</summary>
    public byte[]? Handshake(int rank, int worldSize, RendezvousSecret secret, TimeSpan timeout)
    {
        byte[] hello = EncodeHello(rank, worldSize, RandomNumberGenerator.GetBytes(NonceBytes));
        SendFrame(hello);
        byte[]? challenge = ReadFrame(timeout);
        if (challenge is null || challenge[0] != Challenge) return challenge;
        var keys = SessionKeys.Derive(secret, hello, challenge.AsSpan(1));
        SendFrame(EncodeFixed(Proof, keys.ClientProof));
        byte[]? answer = ReadFrame(timeout);
        if (answer is not null && answer[0] == Welcome)
        {
            Sealer = new FrameCipher(keys.ClientToServer);
            Opener = new FrameCipher(keys.ServerToClient);
        }
        return answer;
    }

    public void Dispose()
    {
        Sealer?.Dispose();
        Opener?.Dispose();
        Socket.Dispose();
    }
}

internal static class Bootstrap
{
    /// <summary>
    /// What the runtime does at start-up, per rank on its own thread: connect, rank 0 publishes a 128-byte id,
    /// the others read it, all meet at a barrier. Returns each rank's id bytes and the wall time.
    /// </summary>
    public static (byte[][] Ids, TimeSpan Elapsed) Run(int port, int ranks, int worldSize, RendezvousSecret secret, string tag,
        Action<int, RendezvousClient>? during = null)
    {
        var ids = new byte[ranks][];
        var errors = new Exception?[ranks];
        byte[] idBytes = RandomNumberGenerator.GetBytes(NcclUniqueId.Size);
        var clock = Stopwatch.StartNew();
        var threads = Enumerable.Range(0, ranks).Select(rank => new Thread(() =>
        {
            try
            {
                using var store = RendezvousClient.Connect("127.0.0.1", port, rank, worldSize, secret, TimeSpan.FromSeconds(10));
                string key = $"{tag}/nccl-id";
                if (rank == 0) NcclUniqueId.FromBytes(idBytes).PublishTo(store, key);
                var id = NcclUniqueId.ReadFrom(store, TimeSpan.FromSeconds(10), key);
                ids[rank] = new byte[NcclUniqueId.Size];
                id.CopyTo(ids[rank]);
                during?.Invoke(rank, store);
                store.Barrier($"{tag}/end", ranks, TimeSpan.FromSeconds(10));
            }
            catch (Exception e) { errors[rank] = e; }
        }) { IsBackground = true }).ToArray();
        foreach (var t in threads) t.Start();
        foreach (var t in threads) Assert.True(t.Join(TimeSpan.FromSeconds(30)), "a rank thread did not finish within 30 s");
        var elapsed = clock.Elapsed;
        for (int r = 0; r < ranks; r++)
            if (errors[r] is { } e) Assert.Fail($"rank {r} failed: {e}");
        foreach (byte[] got in ids) Assert.Equal(idBytes, got);
        return (ids, elapsed);
    }
}

/// <summary>
/// Runs another rank's side of a test on a thread of its own. A thread-pool task can wait seconds for a thread
/// when the pool's few threads are blocked in socket reads (as these tests' ranks are) and the two cores are
/// busy with other test assemblies; a rank that starts late then fails a barrier it would have passed.
/// </summary>
internal static class OtherRank
{
    public static Task<T> Run<T>(Func<T> body) =>
        Task.Factory.StartNew(body, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);

    public static Task Run(Action body) =>
        Task.Factory.StartNew(body, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
}
