using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Net;
using System.Net.NetworkInformation;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Threading.Channels;
using static Moe.Runtime.Distributed.Rendezvous.RendezvousProtocol;

namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// The rendezvous server rank 0's process hosts at MASTER_ADDR:MASTER_PORT (our launcher and Slurm's srun;
/// under torchrun the agent's store serves instead). It lives as long as that process; rank 0 itself joins
/// it through <see cref="RendezvousClient"/> like every other rank.
/// </summary>
/// <remarks>
/// A shared cluster network is hostile ground, so the server assumes nothing of a peer until it has proved
/// the job's secret (<see cref="RendezvousProtocol"/>), and it must neither crash nor stall on any input:
/// <list type="bullet">
/// <item>All I/O is asynchronous (no thread per connection): an idle connection costs a pending receive.</item>
/// <item>Every frame length is checked against a small bound before anything is read or allocated.</item>
/// <item>Deadlines: the handshake as a whole, and each frame once started, so slow or half-open peers are
/// closed; a peer that does not read its replies is closed when its bounded queue fills.</item>
/// <item>Refusals (bad input, wrong secret, rank out of range or already joined, deadlines) are one log line
/// naming the peer and the reason, and close the connection. No log line contains a value or the secret.</item>
/// <item>An exception serving one connection closes that connection only.</item>
/// </list>
/// </remarks>
public sealed partial class RendezvousServer : IDisposable
{
    private readonly Socket _listener;
    private readonly int _worldSize;
    private readonly RendezvousSecret _secret;
    private readonly TextWriter _log;
    private readonly RendezvousLimits _limits;
    private readonly CancellationTokenSource _stop = new();
    private readonly ConcurrentDictionary<Connection, Task> _connections = new();
    private readonly Connection?[] _ranks;
    private readonly Task _acceptLoop;
    private int _pending, _disposed;

    /// <summary>The address the server listens on.</summary>
    public IPAddress Address { get; }

    /// <summary>The port the server listens on (the ephemeral one the OS chose when started with port 0).</summary>
    public int Port { get; }

    /// <summary>"10.0.0.5:29500" (IPv6 in brackets), as messages name it.</summary>
    public string Endpoint => new IPEndPoint(Address, Port).ToString();

    /// <summary>Ranks connected and authenticated now.</summary>
    public int JoinedRanks { get { lock (_ranks) return _ranks.Count(c => c is not null); } }

    private RendezvousServer(Socket listener, int worldSize, RendezvousSecret secret, TextWriter log, RendezvousLimits limits)
    {
        _listener = listener;
        _worldSize = worldSize;
        _secret = secret;
        _log = TextWriter.Synchronized(log);
        _limits = limits;
        _ranks = new Connection?[worldSize];
        var local = (IPEndPoint)listener.LocalEndPoint!;
        Address = local.Address;
        Port = local.Port;
        _acceptLoop = Task.Run(AcceptLoopAsync);
    }

    /// <summary>
    /// Listens on <paramref name="bind"/> (the interface MASTER_ADDR names, never all of them; see
    /// <see cref="BindAddressFor"/>) and <paramref name="port"/> (0 = ephemeral) for the
    /// <paramref name="worldSize"/> ranks that know <paramref name="secret"/>. Refusals go to
    /// <paramref name="log"/>, one line each. A port in use or an address not of this host is a
    /// <see cref="UserError"/> naming both.
    /// </summary>
    public static RendezvousServer Start(IPAddress bind, int port, int worldSize, RendezvousSecret secret, TextWriter log, RendezvousLimits? limits = null)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(worldSize, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(port);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(port, IPEndPoint.MaxPort);
        if (bind.Equals(IPAddress.Any) || bind.Equals(IPAddress.IPv6Any))
            throw new ArgumentException($"the rendezvous server binds the one address MASTER_ADDR names, not {bind} (all interfaces); see BindAddressFor.", nameof(bind));
        limits ??= new RendezvousLimits();
        if (limits.HandshakeDeadline <= TimeSpan.Zero || limits.FrameDeadline <= TimeSpan.Zero || limits.MaxPendingConnections < 1 ||
            limits.MaxWaitsPerConnection < 1 || limits.MaxQueuedReplies < 1 || limits.MaxStoreBytes < 1)
            throw new ArgumentException($"rendezvous limits must be positive: {limits}", nameof(limits));
        var endpoint = new IPEndPoint(bind, port);
        var listener = new Socket(bind.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            listener.Bind(endpoint);
            listener.Listen(4096); // the kernel caps it at net.core.somaxconn
        }
        catch (SocketException e)
        {
            listener.Dispose();
            string why = e.SocketErrorCode switch
            {
                SocketError.AddressAlreadyInUse =>
                    "the port is already in use (another job, or a process left from an earlier run); choose another MASTER_PORT or stop that process",
                SocketError.AddressNotAvailable =>
                    $"{bind} is not an address of this host; MASTER_ADDR must name the host where rank 0 runs",
                SocketError.AccessDenied => "permission denied (ports below 1024 need privileges); choose another MASTER_PORT",
                _ => $"{e.SocketErrorCode}: {e.Message}",
            };
            throw new UserError($"cannot start the rendezvous server at {endpoint}: {why}.", e);
        }
        return new RendezvousServer(listener, worldSize, secret, log, limits);
    }

    /// <summary>
    /// The local address to bind for MASTER_ADDR: the literal address, or the one of this host's addresses
    /// the name resolves to (IPv4 first). A name that resolves to no address of this host is a
    /// <see cref="UserError"/>: rank 0 must run on the host MASTER_ADDR names.
    /// </summary>
    public static IPAddress BindAddressFor(string masterAddr)
    {
        if (IPAddress.TryParse(masterAddr, out var literal)) return literal;
        IPAddress[] resolved;
        try { resolved = Dns.GetHostAddresses(masterAddr); }
        catch (SocketException e) { throw new UserError($"MASTER_ADDR '{masterAddr}' does not resolve ({e.SocketErrorCode}).", e); }
        var local = NetworkInterface.GetAllNetworkInterfaces()
            .SelectMany(i => i.GetIPProperties().UnicastAddresses).Select(u => u.Address).ToHashSet();
        var mine = resolved.Where(local.Contains).OrderBy(a => a.AddressFamily == AddressFamily.InterNetwork ? 0 : 1).ToArray();
        return mine.Length > 0 ? mine[0] : throw new UserError(
            $"MASTER_ADDR '{masterAddr}' resolves to {string.Join(", ", resolved.Select(a => a.ToString()))}, none of which is an address " +
            "of this host; rank 0 hosts the rendezvous server and must run on the host MASTER_ADDR names.");
    }

    private sealed class Connection(Socket socket, string peer, RendezvousLimits limits)
    {
        public Socket Socket { get; } = socket;
        public string Peer { get; } = peer;
        public int Rank { get; set; } = -1;
        public CancellationTokenSource Closed { get; } = new();
        public Channel<byte[]> Outbox { get; } = Channel.CreateBounded<byte[]>(
            new BoundedChannelOptions(limits.MaxQueuedReplies) { SingleReader = true, FullMode = BoundedChannelFullMode.Wait });
        public FrameCipher? Sealer { get; set; }
        public FrameCipher? Opener { get; set; }
        public Task Writer { get; set; } = Task.CompletedTask;
        public int Waits; // blocking GETs parked, under the store's lock
        public int Refused;
        public volatile bool Closing; // no more replies: closed, or told the server is shutting down
        public string Who => Rank >= 0 ? $"rank {Rank} at {Peer}" : Peer;
    }

    private async Task AcceptLoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket socket;
            try
            {
                socket = await _listener.AcceptAsync(_stop.Token);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException)
            {
                return;
            }
            catch (SocketException e)
            {
                // e.g. out of file descriptors: say so and keep serving the connections we have.
                _log.WriteLine($"rendezvous server {Endpoint}: accept failed ({e.SocketErrorCode}: {e.Message}); retrying in 100 ms");
                try { await Task.Delay(100, _stop.Token); } catch (OperationCanceledException) { return; }
                continue;
            }
            string peer = PeerOf(socket);
            var conn = new Connection(socket, peer, _limits);
            if (Interlocked.Increment(ref _pending) > _limits.MaxPendingConnections)
            {
                Interlocked.Decrement(ref _pending);
                Refuse(conn, $"too many connections are authenticating at once (limit {_limits.MaxPendingConnections})");
                Close(conn);
                continue;
            }
            // Registered before it starts, so that its own removal at the end cannot come first.
            _connections[conn] = Task.CompletedTask;
            _connections.TryUpdate(conn, Task.Run(() => ServeAsync(conn)), Task.CompletedTask);
        }
    }

    private async Task ServeAsync(Connection conn)
    {
        bool authenticated = false;
        try
        {
            using (var handshake = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token, conn.Closed.Token))
            {
                handshake.CancelAfter(_limits.HandshakeDeadline);
                try
                {
                    authenticated = await HandshakeAsync(conn, handshake.Token);
                }
                catch (OperationCanceledException) when (!_stop.IsCancellationRequested && !conn.Closed.IsCancellationRequested)
                {
                    Refuse(conn, $"did not complete the handshake within {RendezvousKeys.Seconds(_limits.HandshakeDeadline)} (slow, idle or half-open client)");
                }
                finally
                {
                    Interlocked.Decrement(ref _pending);
                }
            }
            if (authenticated) await RunSessionAsync(conn);
        }
        catch (ProtocolViolation v)
        {
            Refuse(conn, v.Message);
        }
        catch (EndOfStreamException)
        {
            if (!authenticated) Refuse(conn, "closed the connection before authenticating");
        }
        catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException or OperationCanceledException)
        {
            if (!authenticated && !_stop.IsCancellationRequested) Refuse(conn, $"connection lost during the handshake ({e.GetType().Name}: {e.Message})");
        }
        catch (Exception e)
        {
            // A bug of ours must not take the server down with it: this connection goes, the others stay.
            _log.WriteLine($"rendezvous server {Endpoint}: internal error serving {conn.Who}, connection closed: {e}");
        }
        finally
        {
            Close(conn);
            _connections.TryRemove(conn, out _);
        }
    }

    /// <summary>Runs the handshake; false when it refused the peer (already logged), true once WELCOME is sent.</summary>
    private async Task<bool> HandshakeAsync(Connection conn, CancellationToken ct)
    {
        var hello = DecodeHello(await ReadFrameAsync(conn.Socket, MaxHandshakeFrame, "handshake", ct, ct));
        if (hello.Version != ProtocolVersion)
            return await RejectAsync(conn, RejectReason.BadVersion, ProtocolVersion, $"speaks protocol version {hello.Version}; this server speaks {ProtocolVersion} (mixed Moe builds)", ct);

        byte[] serverNonce = RandomNumberGenerator.GetBytes(NonceBytes);
        await SendFrameAsync(conn.Socket, EncodeFixed(Challenge, serverNonce), ct);
        var keys = SessionKeys.Derive(_secret, hello.Body, serverNonce);
        byte[] proof = DecodeFixed(await ReadFrameAsync(conn.Socket, MaxHandshakeFrame, "handshake", ct, ct), Proof, MacBytes, "PROOF");

        // Only a peer that proved the secret learns anything about the job (world size, ranks taken).
        if (!CryptographicOperations.FixedTimeEquals(proof, keys.ClientProof))
            return await RejectAsync(conn, RejectReason.WrongSecret, 0,
                $"claims rank {hello.Rank} but failed the secret check (not this job's, or its {RendezvousSecret.EnvironmentVariable} differs)", ct);
        if (hello.WorldSize != _worldSize)
            return await RejectAsync(conn, RejectReason.WorldSizeMismatch, _worldSize,
                $"rank {hello.Rank} expects a world of {hello.WorldSize} ranks; this job has {_worldSize}", ct);
        if (hello.Rank < 0 || hello.Rank >= _worldSize)
            return await RejectAsync(conn, RejectReason.RankOutOfRange, _worldSize, $"claims rank {hello.Rank}, outside [0, {_worldSize})", ct);
        Connection? holder;
        lock (_ranks)
        {
            holder = _ranks[hello.Rank];
            if (holder is null) _ranks[hello.Rank] = conn;
        }
        if (holder is not null)
            return await RejectAsync(conn, RejectReason.DuplicateRank, hello.Rank, $"claims rank {hello.Rank}, which {holder.Peer} already holds", ct);
        conn.Rank = hello.Rank;
        conn.Opener = new FrameCipher(keys.ClientToServer);
        conn.Sealer = new FrameCipher(keys.ServerToClient);
        await SendFrameAsync(conn.Socket, EncodeFixed(Welcome, keys.ServerProof), ct);
        return true;
    }

    private async Task<bool> RejectAsync(Connection conn, RejectReason reason, int detail, string why, CancellationToken ct)
    {
        Refuse(conn, why);
        try { await SendFrameAsync(conn.Socket, EncodeReject(reason, detail), ct); }
        catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException or OperationCanceledException) { }
        return false;
    }

    private async Task RunSessionAsync(Connection conn)
    {
        conn.Writer = WriteLoopAsync(conn);
        using var session = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token, conn.Closed.Token);
        while (!conn.Closed.IsCancellationRequested)
        {
            byte[]? sealedFrame;
            using (var frame = CancellationTokenSource.CreateLinkedTokenSource(session.Token))
            {
                try
                {
                    // Idle between frames as long as the rank likes; once a frame starts, it has FrameDeadline.
                    sealedFrame = await ReadFrameAsync(conn.Socket, MaxSealedFrame, "session", session.Token, frame.Token,
                        onFrameStart: () => frame.CancelAfter(_limits.FrameDeadline), closeIsClean: true);
                }
                catch (OperationCanceledException) when (frame.IsCancellationRequested && !_stop.IsCancellationRequested && !conn.Closed.IsCancellationRequested)
                {
                    Refuse(conn, $"started a frame and did not finish it within {RendezvousKeys.Seconds(_limits.FrameDeadline)} (half-open or stalled)");
                    return;
                }
            }
            if (sealedFrame is null) return; // the rank closed its connection between frames
            Dispatch(conn, conn.Opener!.Open(sealedFrame));
        }
    }

    private async Task WriteLoopAsync(Connection conn)
    {
        try
        {
            await foreach (byte[] body in conn.Outbox.Reader.ReadAllAsync(conn.Closed.Token))
            {
                using var send = CancellationTokenSource.CreateLinkedTokenSource(conn.Closed.Token);
                send.CancelAfter(_limits.FrameDeadline);
                try
                {
                    await SendFrameAsync(conn.Socket, conn.Sealer!.Seal(body), send.Token);
                }
                catch (OperationCanceledException) when (!conn.Closed.IsCancellationRequested)
                {
                    Refuse(conn, $"did not take a reply within {RendezvousKeys.Seconds(_limits.FrameDeadline)} (not reading)");
                    Close(conn);
                    return;
                }
            }
        }
        catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException or OperationCanceledException)
        {
            Close(conn);
        }
    }

    /// <summary>Queues a reply; a connection whose queue is full is not reading and is closed.</summary>
    private void Send(Connection conn, byte[] body)
    {
        if (conn.Closing || conn.Outbox.Writer.TryWrite(body) || conn.Closing) return;
        Refuse(conn, $"has {_limits.MaxQueuedReplies} replies queued that it does not read");
        Close(conn);
    }

    private void Refuse(Connection conn, string reason)
    {
        if (Interlocked.Exchange(ref conn.Refused, 1) == 0)
            _log.WriteLine($"rendezvous server {Endpoint}: refused {conn.Who}: {reason}");
    }

    private void Close(Connection conn)
    {
        lock (_ranks)
        {
            if (conn.Rank >= 0 && ReferenceEquals(_ranks[conn.Rank], conn)) _ranks[conn.Rank] = null;
        }
        conn.Closing = true;
        conn.Outbox.Writer.TryComplete();
        conn.Closed.Cancel();
        try { conn.Socket.Shutdown(SocketShutdown.Both); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
        conn.Socket.Dispose();
    }

    /// <summary>
    /// Reads one frame: the u32 length (checked against <paramref name="maxBody"/> before anything else), then
    /// the body. <paramref name="idle"/> bounds the wait for the first byte, <paramref name="busy"/> the rest.
    /// Returns null when the peer closed cleanly before a frame began and <paramref name="closeIsClean"/>.
    /// </summary>
    private static async Task<byte[]?> ReadFrameAsync(Socket socket, int maxBody, string phase, CancellationToken idle, CancellationToken busy,
        Action? onFrameStart = null, bool closeIsClean = false)
    {
        byte[] header = new byte[4];
        int first = await socket.ReceiveAsync(header.AsMemory(0, 4), SocketFlags.None, idle);
        if (first == 0)
        {
            if (closeIsClean) return null;
            throw new EndOfStreamException();
        }
        onFrameStart?.Invoke();
        await ReadExactAsync(socket, header.AsMemory(first), busy);
        uint length = BinaryPrimitives.ReadUInt32LittleEndian(header);
        if (length == 0 || length > maxBody)
            throw new ProtocolViolation($"frame of {length} bytes announced; the {phase} allows 1 to {maxBody}");
        byte[] body = new byte[length];
        await ReadExactAsync(socket, body, busy);
        return body;
    }

    private static async Task ReadExactAsync(Socket socket, Memory<byte> buffer, CancellationToken ct)
    {
        while (!buffer.IsEmpty)
        {
            int n = await socket.ReceiveAsync(buffer, SocketFlags.None, ct);
            if (n == 0) throw new EndOfStreamException();
            buffer = buffer[n..];
        }
    }

    private static async Task SendFrameAsync(Socket socket, byte[] body, CancellationToken ct)
    {
        byte[] frame = new byte[4 + body.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(frame, (uint)body.Length);
        body.CopyTo(frame, 4);
        for (int sent = 0; sent < frame.Length;)
            sent += await socket.SendAsync(frame.AsMemory(sent), SocketFlags.None, ct);
    }

    private static string PeerOf(Socket socket)
    {
        try { return socket.RemoteEndPoint?.ToString() ?? "an unknown peer"; }
        catch (SocketException) { return "an unknown peer"; }
    }

    /// <summary>
    /// Stops accepting, tells every joined rank the server is shutting down (their waits fail with that
    /// reason rather than a reset), and closes all connections. Waits at most about two seconds.
    /// </summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 1) return;
        _listener.Dispose();
        var joined = _connections.Keys.Where(c => c.Sealer is not null).ToArray();
        foreach (var conn in joined)
        {
            conn.Outbox.Writer.TryWrite(new Writer(OpShutdown, 0).ToArray());
            conn.Closing = true;
            conn.Outbox.Writer.TryComplete();
        }
        WaitQuietly(joined.Select(c => c.Writer), TimeSpan.FromSeconds(1));
        _stop.Cancel();
        foreach (var conn in _connections.Keys) Close(conn);
        WaitQuietly([_acceptLoop, .. _connections.Values], TimeSpan.FromSeconds(1));
    }

    /// <summary>Waits for tasks that handle their own errors; a fault seen here was already logged or is moot at shutdown.</summary>
    private static void WaitQuietly(IEnumerable<Task> tasks, TimeSpan timeout)
    {
        try { Task.WhenAll(tasks).Wait(timeout); }
        catch (AggregateException) { }
    }
}
