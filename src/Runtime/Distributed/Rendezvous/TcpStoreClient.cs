using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using static Moe.Runtime.Distributed.Rendezvous.TcpStoreWire;

namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// A client of PyTorch's TCPStore, for runs under <c>torchrun --no-python</c>: torchrun's agent already serves
/// a TCPStore at MASTER_ADDR:MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE=True) and our ranks join it as its
/// Python workers would, under the prefix "/worker/attempt_&lt;TORCHELASTIC_RESTART_COUNT&gt;" (wire format:
/// <see cref="TcpStoreWire"/>).
/// </summary>
/// <remarks>
/// That store authenticates nobody, so with a job secret every value this client sets is sealed
/// (<see cref="SealedValue"/>: AES-GCM, key derived from the secret) and every value it reads must open
/// under the same secret; counters (ADD) stay plaintext, since the server adds them. Without a secret,
/// anyone who reaches the port reads the NCCL unique id and may write any key (docs/distributed-security.md).
///
/// Thread-safe: one request at a time on the connection, and a blocking <see cref="Get"/> waits in slices of
/// <see cref="WaitSlice"/> (WAIT, then CANCEL_WAIT if the key did not appear), releasing the connection
/// between slices so that a watchdog's <see cref="TryGet"/> gets through within one slice.
/// </remarks>
public sealed class TcpStoreClient : IRendezvousStore
{
    /// <summary>Longest one blocking wait holds the connection before it lets another request through.</summary>
    internal TimeSpan WaitSlice { get; init; } = TimeSpan.FromMilliseconds(250);

    /// <summary>How long a reply to a non-blocking request may take before the store is called stalled.</summary>
    private static readonly TimeSpan ReplyTimeout = TimeSpan.FromSeconds(30);

    private const int MaxStoredValue = IRendezvousStore.MaxValueBytes + SealedValue.Overhead;

    private readonly Socket _socket;
    private readonly string _server, _prefix;
    private readonly byte[]? _valueKey;
    private readonly object _lock = new();
    private volatile string? _failure;

    /// <inheritdoc/>
    public string Endpoint => $"torchrun store {_server}";

    private TcpStoreClient(Socket socket, string server, string prefix, RendezvousSecret? secret)
    {
        _socket = socket;
        _server = server;
        _prefix = prefix;
        _valueKey = secret?.DeriveKey("moe rendezvous v1 torchrun store values");
        _socket.ReceiveTimeout = _socket.SendTimeout = (int)ReplyTimeout.TotalMilliseconds;
    }

    /// <summary>The PrefixStore prefix torch's workers use for restart attempt <paramref name="restartCount"/>.</summary>
    public static string TorchrunPrefix(int restartCount) => $"/worker/attempt_{restartCount}";

    /// <summary>
    /// Joins torchrun's agent store from a worker's environment: MASTER_ADDR, MASTER_PORT,
    /// TORCHELASTIC_RESTART_COUNT (the key prefix). Requires TORCHELASTIC_USE_AGENT_STORE=True; when torchrun
    /// did not offer its store (e.g. the etcd rendezvous), rank 0 hosts a <see cref="RendezvousServer"/> at
    /// MASTER_ADDR:MASTER_PORT instead, as under our own launcher.
    /// </summary>
    public static TcpStoreClient ConnectToTorchrunAgent(Func<string, string?> getEnv, RendezvousSecret? secret, TimeSpan deadline)
    {
        string Require(string name) => getEnv(name) is { Length: > 0 } v ? v
            : throw new UserError($"{name} is not set; torchrun sets it for every worker (is this process started by torchrun?).");
        if (getEnv("TORCHELASTIC_USE_AGENT_STORE") != "True")
            throw new InvalidOperationException(
                $"TORCHELASTIC_USE_AGENT_STORE is '{getEnv("TORCHELASTIC_USE_AGENT_STORE")}', so torchrun serves no store at MASTER_ADDR:MASTER_PORT; rank 0 must host a RendezvousServer there.");
        string host = Require("MASTER_ADDR");
        string portText = Require("MASTER_PORT");
        if (!int.TryParse(portText, NumberStyles.None, CultureInfo.InvariantCulture, out int port) || port < 1 || port > IPEndPoint.MaxPort)
            throw new UserError($"MASTER_PORT '{portText}' is not a port number (1 to 65535).");
        string restarts = getEnv("TORCHELASTIC_RESTART_COUNT") ?? "0";
        if (!int.TryParse(restarts, NumberStyles.None, CultureInfo.InvariantCulture, out int attempt))
            throw new UserError($"TORCHELASTIC_RESTART_COUNT '{restarts}' is not a non-negative integer.");
        return Connect(host, port, TorchrunPrefix(attempt), secret, deadline);
    }

    /// <summary>
    /// Connects to the TCPStore at <paramref name="host"/>:<paramref name="port"/>, retrying until
    /// <paramref name="deadline"/> while nothing listens, then VALIDATEs and PINGs it as torch's client does.
    /// Keys are placed under <paramref name="prefix"/> as a PrefixStore would; values are sealed when
    /// <paramref name="secret"/> is given. Failures are <see cref="UserError"/>s naming address and port.
    /// </summary>
    public static TcpStoreClient Connect(string host, int port, string prefix, RendezvousSecret? secret, TimeSpan deadline)
    {
        string server = host.Contains(':') && !host.StartsWith('[') ? $"[{host}]:{port}" : $"{host}:{port}";
        var clock = Stopwatch.StartNew();
        string lastError = "nothing tried";
        var backoff = TimeSpan.FromMilliseconds(50);
        while (clock.Elapsed < deadline)
        {
            var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            try
            {
                using var cts = new CancellationTokenSource(deadline - clock.Elapsed);
                socket.ConnectAsync(host, port, cts.Token).AsTask().GetAwaiter().GetResult();
            }
            catch (SocketException e) when (e.SocketErrorCode == SocketError.HostNotFound)
            {
                socket.Dispose();
                throw new UserError($"cannot reach the torchrun store at {server}: '{host}' does not resolve (check MASTER_ADDR).", e);
            }
            catch (Exception e) when (e is SocketException or OperationCanceledException)
            {
                socket.Dispose();
                lastError = e is SocketException s ? $"{s.SocketErrorCode}" : "connection attempt timed out";
                Thread.Sleep(backoff);
                backoff = backoff * 2 < TimeSpan.FromSeconds(1) ? backoff * 2 : TimeSpan.FromSeconds(1);
                continue;
            }
            var client = new TcpStoreClient(socket, server, prefix, secret);
            client.Handshake();
            return client;
        }
        throw new UserError($"no torchrun store answered at {server} within {RendezvousKeys.Seconds(deadline)} (last attempt: {lastError}); check MASTER_ADDR and MASTER_PORT.");
    }

    private void Handshake()
    {
        uint nonce = (uint)Environment.ProcessId;
        uint echoed;
        try
        {
            Write(Validate());
            Write(Ping(nonce));
            echoed = BinaryPrimitives.ReadUInt32LittleEndian(ReadExact(4));
        }
        catch (Exception e) when (e is SocketException or EndOfStreamException)
        {
            Dispose();
            // A peer that closes with our PING still unread resets the connection instead of ending it: both are a close.
            bool closed = e is EndOfStreamException or SocketException { SocketErrorCode: SocketError.ConnectionReset };
            throw new UserError(
                $"the peer at {_server} did not answer a TCPStore ping ({(closed ? "it closed the connection" : ((SocketException)e).SocketErrorCode.ToString())}): " +
                "it is not torchrun's store (a Moe rendezvous server needs RendezvousClient).", e);
        }
        if (echoed != nonce)
        {
            Dispose();
            throw new UserError($"the peer at {_server} answered the TCPStore ping with {echoed}, not {nonce}: it is not a PyTorch TCPStore (check MASTER_PORT).");
        }
    }

    /// <inheritdoc/>
    public void Set(string key, ReadOnlySpan<byte> value)
    {
        RendezvousKeys.KeyBytes(key);
        RendezvousKeys.CheckValue(key, value.Length);
        string wire = WireKey(_prefix, key);
        byte[] stored = _valueKey is null ? value.ToArray() : SealedValue.Seal(_valueKey, wire, value);
        Locked(() => Write(TcpStoreWire.Set(wire, stored)));
    }

    /// <inheritdoc/>
    public byte[] Get(string key, TimeSpan timeout)
    {
        RendezvousKeys.KeyBytes(key);
        if (timeout < TimeSpan.Zero || timeout == Timeout.InfiniteTimeSpan)
            throw new ArgumentOutOfRangeException(nameof(timeout), timeout, "a rendezvous wait needs a finite, non-negative timeout");
        string wire = WireKey(_prefix, key);
        var clock = Stopwatch.StartNew();
        while (true)
        {
            TimeSpan left = timeout - clock.Elapsed;
            TimeSpan slice = left < WaitSlice ? left : WaitSlice;
            byte[]? stored = Locked(() => WaitFor(wire, slice) ? ReadValue(wire) : null);
            if (stored is not null) return Open(key, wire, stored);
            if (clock.Elapsed >= timeout)
                throw new RendezvousTimeoutException(
                    $"waited {RendezvousKeys.Seconds(clock.Elapsed)} for key '{key}' at the torchrun store {_server} (as '{wire}'); " +
                    "no rank set it in that time (the rank that should have failed or is still starting; its log says which).");
        }
    }

    /// <inheritdoc/>
    public bool TryGet(string key, out byte[] value)
    {
        RendezvousKeys.KeyBytes(key);
        string wire = WireKey(_prefix, key);
        byte[]? stored = Locked(() => WaitFor(wire, TimeSpan.Zero) ? ReadValue(wire) : null);
        value = stored is null ? [] : Open(key, wire, stored);
        return stored is not null;
    }

    /// <inheritdoc/>
    public long Add(string key, long delta)
    {
        RendezvousKeys.KeyBytes(key);
        string wire = WireKey(_prefix, key);
        return Locked(() =>
        {
            Write(TcpStoreWire.Add(wire, delta));
            return BinaryPrimitives.ReadInt64LittleEndian(ReadExact(8));
        });
    }

    /// <inheritdoc/>
    public void Barrier(string name, int parties, TimeSpan timeout) => RendezvousKeys.RunBarrier(this, name, parties, timeout);

    /// <summary>
    /// Under the lock: true once <paramref name="wire"/> exists, waiting at most <paramref name="slice"/>
    /// (zero: a CHECK). A WAIT that sees no answer in time is cancelled as torch's client cancels it; a
    /// STOP_WAITING that crossed the CANCEL_WAIT means the key is there after all.
    /// </summary>
    private bool WaitFor(string wire, TimeSpan slice)
    {
        if (slice <= TimeSpan.Zero)
        {
            Write(Check(wire));
            return ReadExact(1)[0] switch
            {
                CheckReady => true,
                CheckNotReady => false,
                var b => throw new ProtocolViolation($"CHECK answered {b}, not 0 or 1"),
            };
        }
        Write(Wait(wire));
        if (_socket.Poll(slice, SelectMode.SelectRead)) return ExpectByte(StopWaiting, "WAIT") == StopWaiting;
        Write(CancelWait());
        byte first = ReadExact(1)[0];
        if (first == WaitCanceled) return false;
        if (first != StopWaiting) throw new ProtocolViolation($"CANCEL_WAIT answered {first}, not 0 or 1");
        ExpectByte(WaitCanceled, "CANCEL_WAIT after STOP_WAITING");
        return true;
    }

    private byte ExpectByte(byte expected, string what)
    {
        byte b = ReadExact(1)[0];
        return b == expected ? b : throw new ProtocolViolation($"{what} answered {b}, expected {expected}");
    }

    private byte[] ReadValue(string wire)
    {
        Write(TcpStoreWire.Get(wire));
        return ReadVector(ReadExact, MaxStoredValue);
    }

    /// <summary>The plaintext of a stored value: sealed ones must open under this job's secret, plain ones are refused when a secret is set.</summary>
    private byte[] Open(string key, string wire, byte[] stored)
    {
        string where = $"the value under '{key}' at the torchrun store {_server}";
        if (_valueKey is null)
        {
            if (SealedValue.LooksSealed(stored))
                throw new RendezvousException($"{where} is sealed with a job secret, but this rank has no {RendezvousSecret.EnvironmentVariable}; give every rank the same value.");
            return stored;
        }
        if (!SealedValue.LooksSealed(stored))
            throw new RendezvousException(
                $"{where} is not sealed: the rank that wrote it runs without {RendezvousSecret.EnvironmentVariable}, or another program wrote it. Give every rank the same value.");
        return SealedValue.Open(_valueKey, wire, stored) ?? throw new RendezvousException(
            $"{where} failed authentication: it was sealed with a different {RendezvousSecret.EnvironmentVariable} or altered by another process.");
    }

    /// <summary>
    /// Runs one exchange under the lock. Any I/O or protocol failure leaves the byte stream at an unknown point,
    /// so it marks the connection dead and every later call fails with the same reason.
    /// </summary>
    private T Locked<T>(Func<T> exchange)
    {
        lock (_lock)
        {
            if (_failure is not null) throw new RendezvousException(_failure);
            try
            {
                return exchange();
            }
            catch (Exception e) when (e is SocketException or EndOfStreamException or ProtocolViolation or ObjectDisposedException)
            {
                _failure = e switch
                {
                    SocketException { SocketErrorCode: SocketError.TimedOut or SocketError.WouldBlock } =>
                        $"the torchrun store at {_server} did not answer within {RendezvousKeys.Seconds(ReplyTimeout)} (stalled).",
                    EndOfStreamException or SocketException { SocketErrorCode: SocketError.ConnectionReset } =>
                        $"the torchrun store at {_server} closed the connection (the torchrun agent exited?).",
                    ProtocolViolation v => $"the torchrun store at {_server} answered out of protocol ({v.Message}); is it torch 2.x's TCPStore?",
                    ObjectDisposedException => "this TCPStore client was disposed.",
                    _ => $"the connection to the torchrun store at {_server} failed ({((SocketException)e).SocketErrorCode}).",
                };
                throw new RendezvousException(_failure, e);
            }
        }
    }

    private void Locked(Action exchange) => Locked(() => { exchange(); return 0; });

    private void Write(byte[] query)
    {
        for (int sent = 0; sent < query.Length;) sent += _socket.Send(query, sent, query.Length - sent, SocketFlags.None);
    }

    private byte[] ReadExact(int n)
    {
        byte[] buffer = new byte[n];
        for (int read = 0; read < n;)
        {
            int got = _socket.Receive(buffer, read, n - read, SocketFlags.None);
            if (got == 0) throw new EndOfStreamException();
            read += got;
        }
        return buffer;
    }

    /// <summary>Closes the connection (the agent's store lives on; torch's workers never delete their keys either).</summary>
    public void Dispose()
    {
        _failure ??= "this TCPStore client was disposed."; // not under the lock: a blocked exchange is what Dispose ends
        _socket.Dispose();
    }
}
