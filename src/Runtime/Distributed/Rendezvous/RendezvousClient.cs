using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using static Moe.Runtime.Distributed.Rendezvous.RendezvousProtocol;

namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// One rank's connection to the <see cref="RendezvousServer"/> rank 0 hosts (rank 0 connects too). Thread-safe:
/// requests are numbered, several may be outstanding, and a reader thread hands each reply to its caller, so a
/// watchdog's <see cref="TryGet"/> is answered while the main thread blocks in <see cref="Get"/>.
/// </summary>
public sealed class RendezvousClient : IRendezvousStore
{
    /// <summary>How long past a wait's own timeout the client waits for the server's answer before calling it stalled.</summary>
    public static readonly TimeSpan ReplyGrace = TimeSpan.FromSeconds(10);

    /// <summary>Longest a connection attempt or the handshake may take before the client tries again (within the deadline).</summary>
    private static readonly TimeSpan AttemptTimeout = TimeSpan.FromSeconds(10);

    private static readonly TimeSpan MaxWait = TimeSpan.FromMilliseconds(int.MaxValue - 1);

    private readonly Socket _socket;
    private readonly string _server;
    private readonly int _rank;
    private readonly FrameCipher _sealer, _opener;
    private readonly object _sendLock = new();
    private readonly ConcurrentDictionary<uint, TaskCompletionSource<Reply>> _pending = new();
    private readonly Thread _reader;
    private int _nextId, _disposed;
    private volatile string? _failure;

    /// <inheritdoc/>
    public string Endpoint => $"rendezvous server {_server}";

    private RendezvousClient(Socket socket, string server, int rank, SessionKeys keys)
    {
        _socket = socket;
        _server = server;
        _rank = rank;
        _sealer = new FrameCipher(keys.ClientToServer);
        _opener = new FrameCipher(keys.ServerToClient);
        _socket.ReceiveTimeout = 0; // the reader waits as long as the job runs
        _socket.SendTimeout = (int)ReplyGrace.TotalMilliseconds;
        _reader = new Thread(ReadLoop) { IsBackground = true, Name = $"moe rendezvous reader (rank {rank})" };
        _reader.Start();
    }

    /// <summary>
    /// Connects rank <paramref name="rank"/> of <paramref name="worldSize"/> to the server at
    /// <paramref name="host"/>:<paramref name="port"/> and runs the mutual handshake. Retries while no server
    /// answers yet (rank 0 may start last) until <paramref name="deadline"/>; then, or at once for an answer
    /// that retrying cannot change (wrong secret, rank taken or out of range, a different world size, not
    /// our server), throws a <see cref="UserError"/> naming the address, the port and what happened.
    /// </summary>
    public static RendezvousClient Connect(string host, int port, int rank, int worldSize, RendezvousSecret secret, TimeSpan deadline)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(worldSize, 1);
        if (rank < 0 || rank >= worldSize) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"rank must be in [0, {worldSize})");
        ArgumentOutOfRangeException.ThrowIfLessThan(port, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(port, IPEndPoint.MaxPort);
        string server = host.Contains(':') && !host.StartsWith('[') ? $"[{host}]:{port}" : $"{host}:{port}";
        var clock = Stopwatch.StartNew();
        var backoff = TimeSpan.FromMilliseconds(50);
        string lastError = "nothing tried";
        while (true)
        {
            TimeSpan remaining = deadline - clock.Elapsed;
            if (remaining <= TimeSpan.Zero)
                throw new UserError(
                    $"no rendezvous server answered at {server} within {RendezvousKeys.Seconds(deadline)} (last attempt: {lastError}). " +
                    "Rank 0 hosts it: check that rank 0 is running, that MASTER_ADDR and MASTER_PORT name its host and port, " +
                    "and that no firewall blocks the port.");
            TimeSpan attempt = remaining < AttemptTimeout ? remaining : AttemptTimeout;
            Socket? socket = null;
            try
            {
                socket = ConnectSocket(host, port, attempt, server);
                SessionKeys? keys = Handshake(socket, rank, worldSize, secret, attempt, server, ref lastError);
                if (keys is not null) return new RendezvousClient(socket, server, rank, keys);
            }
            catch (SocketException e) when (e.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock)
            {
                lastError = socket is null ? "connection attempt timed out" :
                    $"connected, but no answer to the handshake within {RendezvousKeys.Seconds(attempt)} (is this a Moe rendezvous server? under torchrun use the agent's store)";
            }
            catch (SocketException e)
            {
                lastError = $"{e.SocketErrorCode} ({e.Message})";
            }
            catch (EndOfStreamException)
            {
                lastError = "the server closed the connection before answering (busy, or not a Moe rendezvous server)";
            }
            catch (OperationCanceledException)
            {
                lastError = "connection attempt timed out";
            }
            catch (ProtocolViolation v)
            {
                socket?.Dispose();
                throw new UserError($"the peer at {server} is not a Moe rendezvous server ({v.Message}).", v);
            }
            catch
            {
                socket?.Dispose();
                throw;
            }
            socket?.Dispose();
            TimeSpan pause = backoff + TimeSpan.FromMilliseconds(Random.Shared.Next(0, 50));
            Thread.Sleep(pause < remaining ? pause : remaining);
            backoff = backoff * 2 < TimeSpan.FromSeconds(1) ? backoff * 2 : TimeSpan.FromSeconds(1);
        }
    }

    private static Socket ConnectSocket(string host, int port, TimeSpan timeout, string server)
    {
        IPAddress[] addresses;
        if (IPAddress.TryParse(host.Trim('[', ']'), out var literal)) addresses = [literal];
        else
        {
            try { addresses = Dns.GetHostAddresses(host); }
            catch (SocketException e) when (e.SocketErrorCode == SocketError.HostNotFound)
            {
                throw new UserError($"cannot reach the rendezvous server at {server}: '{host}' does not resolve (check MASTER_ADDR).", e);
            }
        }
        Exception? last = null;
        foreach (var address in addresses.OrderBy(a => a.AddressFamily == AddressFamily.InterNetwork ? 0 : 1))
        {
            var socket = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            using var cts = new CancellationTokenSource(timeout);
            try
            {
                socket.ConnectAsync(new IPEndPoint(address, port), cts.Token).AsTask().GetAwaiter().GetResult();
                return socket;
            }
            catch (Exception e) when (e is SocketException or OperationCanceledException)
            {
                socket.Dispose();
                last = e;
            }
        }
        throw last ?? new SocketException((int)SocketError.HostNotFound);
    }

    /// <summary>The client's half of the handshake; null when the server is busy (retry), else the session keys.</summary>
    private static SessionKeys? Handshake(Socket socket, int rank, int worldSize, RendezvousSecret secret, TimeSpan timeout, string server, ref string lastError)
    {
        socket.ReceiveTimeout = socket.SendTimeout = Math.Max(1, (int)timeout.TotalMilliseconds);
        byte[] hello = EncodeHello(rank, worldSize, RandomNumberGenerator.GetBytes(NonceBytes));
        WriteFrame(socket, hello);
        byte[] challenge = ReadFrame(socket, MaxHandshakeFrame);
        if (challenge[0] == Reject) return Rejected(challenge, rank, worldSize, server, ref lastError);
        byte[] serverNonce = Decode(() => DecodeFixed(challenge, Challenge, NonceBytes, "CHALLENGE"), server);
        var keys = SessionKeys.Derive(secret, hello, serverNonce);
        WriteFrame(socket, EncodeFixed(Proof, keys.ClientProof));
        byte[] answer = ReadFrame(socket, MaxHandshakeFrame);
        if (answer[0] == Reject) return Rejected(answer, rank, worldSize, server, ref lastError);
        byte[] serverProof = Decode(() => DecodeFixed(answer, Welcome, MacBytes, "WELCOME"), server);
        if (!CryptographicOperations.FixedTimeEquals(serverProof, keys.ServerProof))
            throw new UserError(
                $"the peer at {server} answered the rendezvous handshake but could not prove it knows this job's secret: " +
                "it is not this job's rendezvous server (another job on the same MASTER_PORT?).");
        return keys;
    }

    private static byte[] Decode(Func<byte[]> decode, string server)
    {
        try { return decode(); }
        catch (ProtocolViolation v) { throw new UserError($"the peer at {server} is not a Moe rendezvous server ({v.Message}).", v); }
    }

    private static SessionKeys? Rejected(byte[] body, int rank, int worldSize, string server, ref string lastError)
    {
        if (body.Length != 6) throw new UserError($"the peer at {server} is not a Moe rendezvous server (a REJECT of {body.Length} bytes).");
        int detail = BinaryPrimitives.ReadInt32LittleEndian(body.AsSpan(2));
        string prefix = $"the rendezvous server at {server} refused rank {rank}";
        switch ((RejectReason)body[1])
        {
            case RejectReason.Busy:
                lastError = "the server was busy";
                return null;
            case RejectReason.WrongSecret:
                throw new UserError($"{prefix}'s secret: {RendezvousSecret.EnvironmentVariable} differs between ranks (or this is another job's server).");
            case RejectReason.RankOutOfRange:
                throw new UserError($"{prefix}: outside its world [0, {detail}).");
            case RejectReason.WorldSizeMismatch:
                throw new UserError($"{prefix}: this rank expects {worldSize} ranks, the server's job has {detail}; WORLD_SIZE (or SLURM_NTASKS) differs between ranks.");
            case RejectReason.DuplicateRank:
                throw new UserError($"{prefix}: rank {rank} is already connected from another process (two processes claim it: check RANK or SLURM_PROCID), or a process of an earlier run is still alive.");
            case RejectReason.BadVersion:
                throw new UserError($"{prefix}: the server speaks rendezvous protocol {detail}, this rank {ProtocolVersion}; every rank must run the same Moe build.");
            default:
                throw new UserError($"the peer at {server} is not a Moe rendezvous server (unknown REJECT reason {body[1]}).");
        }
    }

    /// <inheritdoc/>
    public void Set(string key, ReadOnlySpan<byte> value)
    {
        byte[] k = RendezvousKeys.KeyBytes(key);
        RendezvousKeys.CheckValue(key, value.Length);
        uint id = NextId();
        Reply reply = Call(id, new Writer(OpSet, id).Key(k).Value(value).ToArray(), ReplyGrace, $"SET '{key}'");
        if (reply.Op != OpOk) throw Unexpected(reply, $"SET '{key}'");
    }

    /// <inheritdoc/>
    public byte[] Get(string key, TimeSpan timeout)
    {
        byte[] k = RendezvousKeys.KeyBytes(key);
        if (timeout < TimeSpan.Zero || timeout == Timeout.InfiniteTimeSpan)
            throw new ArgumentOutOfRangeException(nameof(timeout), timeout, "a rendezvous wait needs a finite, non-negative timeout");
        var clock = Stopwatch.StartNew();
        while (true)
        {
            // The server's timer can fire a moment before this rank's clock says the timeout has passed: ask again
            // for what is left, so a Get never gives up early.
            var left = timeout - clock.Elapsed;
            uint ms = (uint)Math.Min(Math.Ceiling(Math.Max(left.TotalMilliseconds, 0)), uint.MaxValue);
            uint id = NextId();
            Reply reply = Call(id, new Writer(OpGet, id).Key(k).U32(ms).ToArray(), left + ReplyGrace, $"GET '{key}'");
            switch (reply.Op)
            {
                case OpValue: return reply.Value!;
                case OpNotFound when clock.Elapsed < timeout: continue;
                case OpNotFound:
                    throw new RendezvousTimeoutException(
                        $"rank {_rank} waited {RendezvousKeys.Seconds(clock.Elapsed)} for key '{key}' at the rendezvous server {_server}; " +
                        "no rank set it in that time (the rank that should have failed or is still starting; its log says which).");
                default: throw Unexpected(reply, $"GET '{key}'");
            }
        }
    }

    /// <inheritdoc/>
    public bool TryGet(string key, out byte[] value)
    {
        byte[] k = RendezvousKeys.KeyBytes(key);
        uint id = NextId();
        Reply reply = Call(id, new Writer(OpGet, id).Key(k).U32(0).ToArray(), ReplyGrace, $"GET '{key}'");
        switch (reply.Op)
        {
            case OpValue: value = reply.Value!; return true;
            case OpNotFound: value = []; return false;
            default: throw Unexpected(reply, $"GET '{key}'");
        }
    }

    /// <inheritdoc/>
    public long Add(string key, long delta)
    {
        byte[] k = RendezvousKeys.KeyBytes(key);
        uint id = NextId();
        Reply reply = Call(id, new Writer(OpAdd, id).Key(k).I64(delta).ToArray(), ReplyGrace, $"ADD '{key}'");
        return reply.Op == OpInt ? reply.Number : throw Unexpected(reply, $"ADD '{key}'");
    }

    /// <inheritdoc/>
    public void Barrier(string name, int parties, TimeSpan timeout) => RendezvousKeys.RunBarrier(this, name, parties, timeout);

    /// <summary>One reply: its op, and the value, number or error text it carries; op 0 is a failed connection.</summary>
    private sealed record Reply(byte Op, byte[]? Value = null, long Number = 0, string? Text = null);

    private uint NextId() => (uint)Interlocked.Increment(ref _nextId);

    private Reply Call(uint id, byte[] body, TimeSpan wait, string what)
    {
        ThrowIfFailed();
        var reply = new TaskCompletionSource<Reply>(TaskCreationOptions.RunContinuationsAsynchronously);
        _pending[id] = reply;
        if (_failure is not null) // the reader failed between the check and the registration
        {
            _pending.TryRemove(id, out _);
            ThrowIfFailed();
        }
        try
        {
            lock (_sendLock) WriteFrame(_socket, _sealer.Seal(body));
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or IOException)
        {
            _pending.TryRemove(id, out _);
            Fail(e is SocketException { SocketErrorCode: SocketError.TimedOut or SocketError.WouldBlock }
                ? $"the rendezvous server at {_server} did not take a request within {RendezvousKeys.Seconds(ReplyGrace)} (stalled)"
                : Describe(e));
            ThrowIfFailed();
        }
        if (wait > MaxWait) wait = MaxWait; // Task.Wait takes at most int.MaxValue ms; a 24-day wait is a stall all the same
        if (!reply.Task.Wait(wait))
        {
            _pending.TryRemove(id, out _);
            throw new RendezvousException($"the rendezvous server at {_server} did not answer {what} within {RendezvousKeys.Seconds(wait)}: it is overloaded or stalled.");
        }
        Reply r = reply.Task.Result;
        if (r.Op == 0) throw new RendezvousException(r.Text!);
        return r;
    }

    private RendezvousException Unexpected(Reply reply, string what) => reply.Op == OpError
        ? new RendezvousException($"the rendezvous server at {_server} refused {what}: {reply.Text}")
        : new RendezvousException($"the rendezvous server at {_server} answered {what} with message type {reply.Op}.");

    private void ReadLoop()
    {
        try
        {
            while (true)
            {
                byte[] body = _opener.Open(ReadFrame(_socket, MaxSealedFrame));
                var r = new Reader(body);
                byte op = r.U8();
                uint id = r.U32();
                Reply reply = op switch
                {
                    OpOk or OpNotFound => new Reply(op),
                    OpValue => new Reply(op, Value: r.Value()),
                    OpInt => new Reply(op, Number: r.I64()),
                    OpError => new Reply(op, Text: r.Text()),
                    OpShutdown => new Reply(0, Text: $"the rendezvous server at {_server} shut down (rank 0's process is exiting)."),
                    _ => throw new ProtocolViolation($"unknown reply type {op}"),
                };
                r.End();
                if (reply.Op == 0)
                {
                    Fail(reply.Text!);
                    return;
                }
                // A reply nobody waits for answers a request whose caller gave up; it is dropped.
                if (_pending.TryRemove(id, out var waiter)) waiter.TrySetResult(reply);
            }
        }
        catch (Exception e)
        {
            Fail(Describe(e));
        }
    }

    private string Describe(Exception e) => _disposed != 0 ? "this rendezvous client was disposed." : e switch
    {
        EndOfStreamException => $"the rendezvous server at {_server} closed the connection (rank 0's process exited?).",
        ProtocolViolation v => $"the rendezvous server at {_server} sent a malformed frame ({v.Message}).",
        SocketException s => $"the connection to the rendezvous server at {_server} failed ({s.SocketErrorCode}).",
        _ => $"the connection to the rendezvous server at {_server} failed ({e.GetType().Name}: {e.Message}).",
    };

    /// <summary>Marks the connection dead (the first reason wins) and releases every caller waiting on it.</summary>
    private void Fail(string reason)
    {
        _failure ??= reason;
        foreach (uint id in _pending.Keys)
            if (_pending.TryRemove(id, out var waiter)) waiter.TrySetResult(new Reply(0, Text: _failure));
    }

    private void ThrowIfFailed()
    {
        if (_failure is { } reason) throw new RendezvousException(reason);
    }

    /// <summary>Closes the connection; calls blocked on it fail with "disposed". The server frees this rank's slot.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 1) return;
        _failure ??= "this rendezvous client was disposed.";
        try { _socket.Shutdown(SocketShutdown.Both); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
        _socket.Dispose();
        bool readerDone = _reader.Join(TimeSpan.FromSeconds(2));
        Fail(_failure);
        lock (_sendLock) _sealer.Dispose();
        if (readerDone) _opener.Dispose();
    }

    internal static void WriteFrame(Socket socket, ReadOnlySpan<byte> body)
    {
        byte[] frame = new byte[4 + body.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(frame, (uint)body.Length);
        body.CopyTo(frame.AsSpan(4));
        for (int sent = 0; sent < frame.Length;) sent += socket.Send(frame, sent, frame.Length - sent, SocketFlags.None);
    }

    internal static byte[] ReadFrame(Socket socket, int maxBody)
    {
        byte[] header = new byte[4];
        ReadExact(socket, header);
        uint length = BinaryPrimitives.ReadUInt32LittleEndian(header);
        if (length == 0 || length > maxBody) throw new ProtocolViolation($"frame of {length} bytes announced (1 to {maxBody} allowed)");
        byte[] body = new byte[length];
        ReadExact(socket, body);
        return body;
    }

    private static void ReadExact(Socket socket, Span<byte> buffer)
    {
        while (!buffer.IsEmpty)
        {
            int n = socket.Receive(buffer, SocketFlags.None);
            if (n == 0) throw new EndOfStreamException();
            buffer = buffer[n..];
        }
    }
}
