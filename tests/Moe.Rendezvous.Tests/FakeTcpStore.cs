using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace Moe.Rendezvous.Tests;

/// <summary>
/// A TCPStore server written in the test from the protocol as torch 2.x's libuv backend implements it
/// (TCPStoreLibUvBackend.cpp): little-endian, query byte then arguments, strings and vectors as u64 length +
/// bytes; VALIDATE must come first; GET of a missing key answers an empty vector; WAIT answers 0 once all keys
/// exist; CANCEL_WAIT answers 1. It shares no code with the client under test, records every byte each
/// connection sent, and can be told to let a STOP_WAITING cross a CANCEL_WAIT.
/// </summary>
internal sealed class FakeTcpStore : IDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly Dictionary<string, byte[]> _table = new(StringComparer.Ordinal);
    private readonly List<(Stream Stream, string[] Keys)> _waiting = [];
    private readonly List<MemoryStream> _received = [];
    private readonly Thread _acceptor;

    /// <summary>When set, a CANCEL_WAIT is answered 0 then 1, as if the key arrived just before the cancel.</summary>
    public bool CrossStopWaitingWithCancel { get; set; }

    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

    public FakeTcpStore()
    {
        _listener.Start();
        _acceptor = new Thread(Accept) { IsBackground = true };
        _acceptor.Start();
    }

    /// <summary>What connection <paramref name="index"/> sent, in order.</summary>
    public byte[] Received(int index) { lock (_table) return _received[index].ToArray(); }

    public byte[]? Stored(string wireKey) { lock (_table) return _table.GetValueOrDefault(wireKey); }

    /// <summary>Puts a value in the table without waking anyone (for the crossing test).</summary>
    public void PutQuietly(string wireKey, byte[] value) { lock (_table) _table[wireKey] = value; }

    private void Accept()
    {
        try
        {
            while (true)
            {
                var client = _listener.AcceptTcpClient();
                var log = new MemoryStream();
                lock (_table) _received.Add(log);
                new Thread(() => Serve(client, log)) { IsBackground = true }.Start();
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or InvalidOperationException) { }
    }

    private void Serve(TcpClient client, MemoryStream log)
    {
        using var _ = client;
        var s = client.GetStream();
        byte[] Read(int n)
        {
            byte[] b = new byte[n];
            s.ReadExactly(b);
            lock (_table) log.Write(b);
            return b;
        }
        ulong U64() => BinaryPrimitives.ReadUInt64LittleEndian(Read(8));
        string Str() => Encoding.UTF8.GetString(Read((int)U64()));
        void Reply(byte[] b) { lock (s) s.Write(b); }
        try
        {
            if (Read(1)[0] != 0 || BinaryPrimitives.ReadUInt32LittleEndian(Read(4)) != 0x3C85F7CE) return; // VALIDATE first
            while (true)
            {
                byte query = Read(1)[0];
                switch (query)
                {
                    case 13: Reply(Read(4)); break; // PING: echo the nonce
                    case 1: // SET
                    {
                        string key = Str();
                        byte[] value = Read((int)U64());
                        Put(key, value);
                        break;
                    }
                    case 3: // GET
                    {
                        string key = Str();
                        byte[] value;
                        lock (_table) value = _table.GetValueOrDefault(key) ?? [];
                        Reply([.. Le((ulong)value.Length), .. value]);
                        break;
                    }
                    case 4: // ADD
                    {
                        string key = Str();
                        long delta = BinaryPrimitives.ReadInt64LittleEndian(Read(8));
                        long sum;
                        lock (_table) // read and write under one lock: two ranks adding at once must not both read the old sum
                        {
                            sum = delta + (_table.TryGetValue(key, out var old) ? long.Parse(Encoding.ASCII.GetString(old)) : 0);
                            Put(key, Encoding.ASCII.GetBytes(sum.ToString()));
                        }
                        byte[] answer = new byte[8];
                        BinaryPrimitives.WriteInt64LittleEndian(answer, sum);
                        Reply(answer);
                        break;
                    }
                    case 5: // CHECK
                    {
                        string[] keys = Enumerable.Range(0, (int)U64()).Select(_ => Str()).ToArray();
                        lock (_table) Reply([keys.All(_table.ContainsKey) ? (byte)0 : (byte)1]);
                        break;
                    }
                    case 6: // WAIT
                    {
                        string[] keys = Enumerable.Range(0, (int)U64()).Select(_ => Str()).ToArray();
                        lock (_table)
                        {
                            if (keys.All(_table.ContainsKey)) Reply([0]);
                            else _waiting.Add((s, keys));
                        }
                        break;
                    }
                    case 12: // CANCEL_WAIT
                        lock (_table) _waiting.RemoveAll(w => w.Stream == s);
                        Reply(CrossStopWaitingWithCancel ? [0, 1] : [1]);
                        break;
                    default:
                        return; // unknown query: torch closes the connection
                }
            }
        }
        catch (Exception e) when (e is IOException or EndOfStreamException or ObjectDisposedException) { }
    }

    private void Put(string key, byte[] value)
    {
        lock (_table)
        {
            _table[key] = value;
            foreach (var w in _waiting.Where(w => w.Keys.All(_table.ContainsKey)).ToArray())
            {
                _waiting.Remove(w);
                lock (w.Stream) w.Stream.Write([0]);
            }
        }
    }

    private static byte[] Le(ulong v)
    {
        byte[] b = new byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(b, v);
        return b;
    }

    public void Dispose() => _listener.Stop();
}
