using System.Buffers.Binary;
using System.Text;

namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// PyTorch's TCPStore wire format, as torch 2.x's client speaks it (torch/csrc/distributed/c10d/TCPStore.cpp,
/// TCPStoreBackend.hpp; the libuv server in TCPStoreLibUvBackend.cpp and the legacy one parse it alike).
/// Undocumented upstream, so written down here:
/// </summary>
/// <remarks>
/// <list type="bullet">
/// <item>Everything little-endian. A query is its type byte, then its arguments; there is no frame length.
/// A string or a byte vector is a u64 length, then the bytes.</item>
/// <item>A connection's first query is VALIDATE (0) with the u32 0x3C85F7CE; until then the server ignores
/// (libuv) or refuses (legacy) anything else. torch's client then sends PING (13) with a u32 nonce (its pid)
/// and expects the same u32 back.</item>
/// <item>SET (1) key value: no reply. GET (3) key: reply u64 length + bytes (the libuv server answers an
/// empty vector for a missing key, the legacy one drops the connection, so torch WAITs before every GET).
/// ADD (4) key i64: reply i64, the value kept as decimal ASCII. CHECK (5) u64 n, n keys: reply u8 0 when
/// all exist, 1 when not. WAIT (6) u64 n, n keys: reply u8 0 (STOP_WAITING) once all exist, however long that
/// takes. CANCEL_WAIT (12): reply u8 1 (WAIT_CANCELED); a STOP_WAITING already on its way comes first.</item>
/// <item>torch's C++ client puts "/" before every key; Python workers under torchrun wrap the agent's store in
/// PrefixStore("/worker/attempt_N"), which joins prefix + "/" + key. So a worker's key "k" is
/// "//worker/attempt_0/k" on the wire (<see cref="WireKey"/>).</item>
/// <item>The libuv server caps a key at 8 KiB, a value at 8 MiB, a key count at 128 Ki.</item>
/// </list>
/// </remarks>
internal static class TcpStoreWire
{
    public const uint ValidationMagic = 0x3C85F7CE;

    public enum Query : byte
    {
        Validate = 0, Set = 1, CompareSet = 2, Get = 3, Add = 4, Check = 5, Wait = 6, GetNumKeys = 7,
        DeleteKey = 8, Append = 9, MultiGet = 10, MultiSet = 11, CancelWait = 12, Ping = 13,
    }

    public const byte CheckReady = 0, CheckNotReady = 1;
    public const byte StopWaiting = 0, WaitCanceled = 1;

    /// <summary>The key on the wire for <paramref name="key"/> under a PrefixStore <paramref name="prefix"/> (e.g. "/worker/attempt_0").</summary>
    public static string WireKey(string prefix, string key) => "/" + prefix + "/" + key;

    public static byte[] Validate() => Build(Query.Validate, w => w.Write(ValidationMagic));
    public static byte[] Ping(uint nonce) => Build(Query.Ping, w => w.Write(nonce));
    public static byte[] Set(string key, ReadOnlySpan<byte> value)
    {
        byte[] v = value.ToArray();
        return Build(Query.Set, w => { String(w, key); w.Write((ulong)v.Length); w.Write(v); });
    }
    public static byte[] Get(string key) => Build(Query.Get, w => String(w, key));
    public static byte[] Add(string key, long delta) => Build(Query.Add, w => { String(w, key); w.Write(delta); });
    public static byte[] Check(params string[] keys) => Build(Query.Check, w => Keys(w, keys));
    public static byte[] Wait(params string[] keys) => Build(Query.Wait, w => Keys(w, keys));
    public static byte[] CancelWait() => Build(Query.CancelWait, _ => { });

    private static void Keys(BinaryWriter w, string[] keys)
    {
        w.Write((ulong)keys.Length);
        foreach (string k in keys) String(w, k);
    }

    private static void String(BinaryWriter w, string s)
    {
        byte[] b = Encoding.UTF8.GetBytes(s);
        w.Write((ulong)b.Length);
        w.Write(b);
    }

    private static byte[] Build(Query query, Action<BinaryWriter> arguments)
    {
        using var stream = new MemoryStream();
        using (var w = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true))
        {
            w.Write((byte)query);
            arguments(w);
        }
        return stream.ToArray();
    }

    /// <summary>Reads a GET reply (u64 length + bytes), refusing a length above <paramref name="maxBytes"/> before allocating.</summary>
    public static byte[] ReadVector(Func<int, byte[]> readExact, int maxBytes)
    {
        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(readExact(8));
        if (n > (ulong)maxBytes) throw new ProtocolViolation($"a value of {n} bytes, more than the {maxBytes} this client accepts");
        return n == 0 ? [] : readExact((int)n);
    }
}
