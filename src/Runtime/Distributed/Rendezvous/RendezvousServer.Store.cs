using System.Globalization;
using System.Text;
using static Moe.Runtime.Distributed.Rendezvous.RendezvousProtocol;

namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// The key-value store behind the server: SET, GET (immediate or waiting, bounded per connection) and
/// ADD (a counter kept as decimal ASCII, as torch's TCPStore keeps it, so both stores read alike).
/// One lock guards the table and the waiters; replies are queued outside it.
/// </summary>
public sealed partial class RendezvousServer
{
    private const int EntryOverheadBytes = 64;
    private readonly object _gate = new();
    private readonly Dictionary<string, byte[]> _values = new(StringComparer.Ordinal);
    private readonly Dictionary<string, List<Waiter>> _waiters = new(StringComparer.Ordinal);
    private long _storeBytes;

    /// <summary>A GET parked until its key is set, its timeout passes, or its connection closes.</summary>
    private sealed class Waiter(Connection conn, uint requestId)
    {
        public Connection Conn { get; } = conn;
        public uint RequestId { get; } = requestId;
        public CancellationTokenSource Timer { get; } = CancellationTokenSource.CreateLinkedTokenSource(conn.Closed.Token);
    }

    /// <summary>Decodes one request (any malformation is a <see cref="ProtocolViolation"/>) and answers it.</summary>
    private void Dispatch(Connection conn, byte[] body)
    {
        var r = new Reader(body);
        byte op = r.U8();
        uint id = r.U32();
        switch (op)
        {
            case OpSet:
            {
                string key = r.Key();
                byte[] value = r.Value();
                r.End();
                Send(conn, Set(key, value, id));
                break;
            }
            case OpGet:
            {
                string key = r.Key();
                uint timeoutMs = r.U32();
                r.End();
                Get(conn, id, key, timeoutMs);
                break;
            }
            case OpAdd:
            {
                string key = r.Key();
                long delta = r.I64();
                r.End();
                Send(conn, Add(key, delta, id));
                break;
            }
            default:
                throw new ProtocolViolation($"unknown request type {op}");
        }
    }

    private byte[] Set(string key, byte[] value, uint id)
    {
        List<Waiter>? woken;
        lock (_gate)
        {
            if (!TryPut(key, value, out woken)) return StoreFull(id);
        }
        Wake(woken, value);
        return new Writer(OpOk, id).ToArray();
    }

    private void Get(Connection conn, uint id, string key, uint timeoutMs)
    {
        byte[] reply;
        Waiter? parked = null;
        lock (_gate)
        {
            if (_values.TryGetValue(key, out byte[]? value)) reply = new Writer(OpValue, id).Value(value).ToArray();
            else if (timeoutMs == 0) reply = new Writer(OpNotFound, id).ToArray();
            else if (conn.Waits >= _limits.MaxWaitsPerConnection)
                reply = new Writer(OpError, id).Text($"more than {_limits.MaxWaitsPerConnection} waits outstanding on one connection").ToArray();
            else
            {
                parked = new Waiter(conn, id);
                if (!_waiters.TryGetValue(key, out var list)) _waiters[key] = list = [];
                list.Add(parked);
                conn.Waits++;
                reply = [];
            }
        }
        if (parked is null) Send(conn, reply);
        else _ = ExpireAsync(parked, key, timeoutMs);
    }

    /// <summary>Answers NOT_FOUND when a wait's time is up; a wait woken by SET or ended by its connection just goes.</summary>
    private async Task ExpireAsync(Waiter w, string key, uint timeoutMs)
    {
        bool timedOut;
        try
        {
            // Task.Delay takes at most int.MaxValue ms (24.8 days); a longer wait is answered then.
            await Task.Delay(TimeSpan.FromMilliseconds(Math.Min(timeoutMs, int.MaxValue - 1u)), w.Timer.Token);
            timedOut = true;
        }
        catch (OperationCanceledException)
        {
            timedOut = false;
        }
        bool removed;
        lock (_gate)
        {
            removed = _waiters.TryGetValue(key, out var list) && list.Remove(w);
            if (removed)
            {
                w.Conn.Waits--;
                if (list!.Count == 0) _waiters.Remove(key);
            }
        }
        w.Timer.Dispose();
        if (removed && timedOut) Send(w.Conn, new Writer(OpNotFound, w.RequestId).ToArray());
    }

    private byte[] Add(string key, long delta, uint id)
    {
        List<Waiter>? woken;
        long sum;
        byte[] text;
        lock (_gate)
        {
            long current = 0;
            if (_values.TryGetValue(key, out byte[]? old) &&
                !long.TryParse(Encoding.ASCII.GetString(old), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out current))
                return new Writer(OpError, id).Text($"key '{key}' holds a value that is not a counter").ToArray();
            try { sum = checked(current + delta); }
            catch (OverflowException) { return new Writer(OpError, id).Text($"counter '{key}' would overflow").ToArray(); }
            text = Encoding.ASCII.GetBytes(sum.ToString(CultureInfo.InvariantCulture));
            if (!TryPut(key, text, out woken)) return StoreFull(id);
        }
        Wake(woken, text);
        return new Writer(OpInt, id).I64(sum).ToArray();
    }

    /// <summary>Under the lock: stores the value within the byte budget and takes the key's waiters.</summary>
    private bool TryPut(string key, byte[] value, out List<Waiter>? woken)
    {
        woken = null;
        long before = _values.TryGetValue(key, out byte[]? old) ? EntryBytes(key, old) : 0;
        long after = _storeBytes - before + EntryBytes(key, value);
        if (after > _limits.MaxStoreBytes) return false;
        _storeBytes = after;
        _values[key] = value;
        if (_waiters.Remove(key, out woken))
            foreach (var w in woken) w.Conn.Waits--;
        return true;
    }

    /// <summary>Outside the lock: answers the waiters a SET or ADD woke.</summary>
    private void Wake(List<Waiter>? woken, byte[] value)
    {
        if (woken is null) return;
        foreach (var w in woken)
        {
            try { w.Timer.Cancel(); } catch (ObjectDisposedException) { } // its timeout ran out at the same moment
            Send(w.Conn, new Writer(OpValue, w.RequestId).Value(value).ToArray());
        }
    }

    private byte[] StoreFull(uint id) =>
        new Writer(OpError, id).Text($"the rendezvous store is full ({_limits.MaxStoreBytes} bytes)").ToArray();

    private static long EntryBytes(string key, byte[] value) => 2L * key.Length + value.Length + EntryOverheadBytes;
}
