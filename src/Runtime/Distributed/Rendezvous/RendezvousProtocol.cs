using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;

namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// The wire format of our rendezvous server, shared by <see cref="RendezvousServer"/> and
/// <see cref="RendezvousClient"/>.
/// </summary>
/// <remarks>
/// Every message is a frame: a little-endian u32 body length, then the body. The receiver checks the
/// length against a small bound before it reads or allocates anything (64 bytes during the handshake,
/// <see cref="MaxSealedFrame"/> after it), so a frame announcing 4 GB costs nothing.
///
/// Handshake, in the clear (mutual challenge–response; the secret never crosses the wire):
/// <code>
/// client → HELLO     01 | "MOE-RDZV" | version u8 | rank i32 | worldSize i32 | clientNonce[32]   (50 bytes)
/// server → CHALLENGE 02 | serverNonce[32]                                                       (33 bytes)
/// client → PROOF     03 | HMAC(k, "client" | T)                                                 (33 bytes)
/// server → WELCOME   04 | HMAC(k, "server" | T)       or   REJECT 05 | reason u8 | detail i32
/// </code>
/// where k = HKDF(secret, "moe rendezvous v1 handshake") and T is the HELLO body followed by the server
/// nonce. Fresh nonces on both sides make every proof single-use; the server checks the rank only after
/// the proof, so an unauthenticated peer learns nothing about the job. After WELCOME every frame body is
/// AES-256-GCM ciphertext and tag under a per-direction key HMAC(k, "c2s"|T) or HMAC(k, "s2c"|T), with a
/// frame counter as nonce: a network reader learns nothing, and a frame altered, replayed, reordered or
/// injected fails authentication and closes the connection.
///
/// Inside, a request is <c>op u8 | requestId u32 | arguments</c> and a response <c>op u8 | requestId u32 |
/// result</c>; requests on one connection may be outstanding together (a blocking GET does not hold up a
/// TRYGET), answered by id. Keys are <c>u16 length | UTF-8</c>, values <c>u32 length | bytes</c>.
/// </remarks>
internal static class RendezvousProtocol
{
    public static ReadOnlySpan<byte> Magic => "MOE-RDZV"u8;
    public const byte ProtocolVersion = 1;
    public const int NonceBytes = 32;
    public const int MacBytes = 32;
    public const int HelloBytes = 1 + 8 + 1 + 4 + 4 + NonceBytes;
    public const int MaxHandshakeFrame = 64;
    public const int TagBytes = 16;
    /// <summary>The largest sealed frame: a SET of the longest key and value, with room to spare.</summary>
    public const int MaxSealedFrame = 8192;

    // Handshake messages.
    public const byte Hello = 1, Challenge = 2, Proof = 3, Welcome = 4, Reject = 5;

    // Requests (client → server) and responses (server → client), inside sealed frames.
    public const byte OpSet = 16, OpGet = 17, OpAdd = 18;
    public const byte OpOk = 32, OpValue = 33, OpNotFound = 34, OpInt = 35, OpError = 36, OpShutdown = 37;

    /// <summary>Why the server refused a handshake, sent in REJECT (only after a valid proof, except <see cref="BadVersion"/> and <see cref="Busy"/>).</summary>
    public enum RejectReason : byte
    {
        WrongSecret = 1,
        RankOutOfRange = 2,
        DuplicateRank = 3,
        WorldSizeMismatch = 4,
        Busy = 5,
        BadVersion = 6,
    }

    public static byte[] EncodeHello(int rank, int worldSize, ReadOnlySpan<byte> clientNonce, byte version = ProtocolVersion)
    {
        byte[] b = new byte[HelloBytes];
        b[0] = Hello;
        Magic.CopyTo(b.AsSpan(1));
        b[9] = version;
        BinaryPrimitives.WriteInt32LittleEndian(b.AsSpan(10), rank);
        BinaryPrimitives.WriteInt32LittleEndian(b.AsSpan(14), worldSize);
        clientNonce.CopyTo(b.AsSpan(18));
        return b;
    }

    /// <summary>The fields of a HELLO body whose type byte and magic were checked; the version is the caller's to check.</summary>
    public readonly record struct HelloMessage(byte Version, int Rank, int WorldSize, byte[] Body);

    public static HelloMessage DecodeHello(ReadOnlySpan<byte> body)
    {
        if (body.Length == 0 || body[0] != Hello) throw new ProtocolViolation($"expected HELLO, got message type {(body.Length == 0 ? "(empty)" : body[0].ToString())}");
        if (body.Length != HelloBytes) throw new ProtocolViolation($"HELLO of {body.Length} bytes, expected {HelloBytes}");
        if (!body.Slice(1, 8).SequenceEqual(Magic)) throw new ProtocolViolation("HELLO without the Moe rendezvous magic (not a Moe rank)");
        return new HelloMessage(body[9], BinaryPrimitives.ReadInt32LittleEndian(body[10..]), BinaryPrimitives.ReadInt32LittleEndian(body[14..]), body.ToArray());
    }

    /// <summary>A handshake message of one type byte and a fixed-size payload (CHALLENGE, PROOF, WELCOME).</summary>
    public static byte[] EncodeFixed(byte type, ReadOnlySpan<byte> payload) => [type, .. payload];

    public static byte[] DecodeFixed(ReadOnlySpan<byte> body, byte type, int payloadBytes, string name)
    {
        if (body.Length == 0 || body[0] != type) throw new ProtocolViolation($"expected {name}, got message type {(body.Length == 0 ? "(empty)" : body[0].ToString())}");
        if (body.Length != 1 + payloadBytes) throw new ProtocolViolation($"{name} of {body.Length} bytes, expected {1 + payloadBytes}");
        return body[1..].ToArray();
    }

    public static byte[] EncodeReject(RejectReason reason, int detail)
    {
        byte[] b = new byte[6];
        b[0] = Reject;
        b[1] = (byte)reason;
        BinaryPrimitives.WriteInt32LittleEndian(b.AsSpan(2), detail);
        return b;
    }

    /// <summary>What both sides derive from the secret and the transcript (HELLO body, then the server nonce).</summary>
    public sealed class SessionKeys
    {
        public required byte[] ClientProof { get; init; }
        public required byte[] ServerProof { get; init; }
        public required byte[] ClientToServer { get; init; }
        public required byte[] ServerToClient { get; init; }

        public static SessionKeys Derive(RendezvousSecret secret, ReadOnlySpan<byte> helloBody, ReadOnlySpan<byte> serverNonce)
        {
            byte[] k = secret.DeriveKey("moe rendezvous v1 handshake");
            byte[] transcript = [.. helloBody, .. serverNonce];
            byte[] Mac(string label)
            {
                byte[] message = [.. Encoding.ASCII.GetBytes(label), .. transcript];
                return HMACSHA256.HashData(k, message);
            }
            return new SessionKeys
            {
                ClientProof = Mac("client"), ServerProof = Mac("server"),
                ClientToServer = Mac("c2s"), ServerToClient = Mac("s2c"),
            };
        }
    }

    /// <summary>
    /// AES-256-GCM for one direction of one connection. The nonce is the frame's sequence number, so the
    /// receiver, counting the same way, rejects any frame replayed, reordered, dropped or injected.
    /// Not thread-safe: each side seals in its single writer and opens in its single reader.
    /// </summary>
    public sealed class FrameCipher(byte[] key) : IDisposable
    {
        private readonly AesGcm _aes = new(key, TagBytes);
        private ulong _sequence;

        public byte[] Seal(ReadOnlySpan<byte> plaintext)
        {
            byte[] sealedFrame = new byte[plaintext.Length + TagBytes];
            _aes.Encrypt(NextNonce(), plaintext, sealedFrame.AsSpan(0, plaintext.Length), sealedFrame.AsSpan(plaintext.Length));
            return sealedFrame;
        }

        public byte[] Open(ReadOnlySpan<byte> sealedFrame)
        {
            if (sealedFrame.Length < TagBytes) throw new ProtocolViolation($"sealed frame of {sealedFrame.Length} bytes, shorter than its tag");
            byte[] plaintext = new byte[sealedFrame.Length - TagBytes];
            try
            {
                _aes.Decrypt(NextNonce(), sealedFrame[..plaintext.Length], sealedFrame[plaintext.Length..], plaintext);
            }
            catch (AuthenticationTagMismatchException)
            {
                throw new ProtocolViolation("a frame failed authentication (altered, replayed or not sealed with this session's key)");
            }
            return plaintext;
        }

        private byte[] NextNonce()
        {
            byte[] nonce = new byte[12];
            BinaryPrimitives.WriteUInt64LittleEndian(nonce, _sequence++);
            return nonce;
        }

        public void Dispose() => _aes.Dispose();
    }

    /// <summary>Builds one request or response body.</summary>
    public sealed class Writer
    {
        private readonly MemoryStream _stream = new();
        private readonly BinaryWriter _w;

        public Writer(byte op, uint requestId)
        {
            _w = new BinaryWriter(_stream); // little-endian on every platform
            _w.Write(op);
            _w.Write(requestId);
        }

        public Writer Key(byte[] utf8) { _w.Write((ushort)utf8.Length); _w.Write(utf8); return this; }
        public Writer Value(ReadOnlySpan<byte> value) { _w.Write((uint)value.Length); _w.Write(value); return this; }
        public Writer U32(uint v) { _w.Write(v); return this; }
        public Writer I64(long v) { _w.Write(v); return this; }
        public Writer Text(string text)
        {
            byte[] b = Encoding.UTF8.GetBytes(text.Length > 1000 ? text[..1000] : text);
            _w.Write((ushort)b.Length);
            _w.Write(b);
            return this;
        }
        public byte[] ToArray() { _w.Flush(); return _stream.ToArray(); }
    }

    /// <summary>Reads one body; every length is checked against its bound and against what is left.</summary>
    public ref struct Reader(ReadOnlySpan<byte> body)
    {
        private static readonly UTF8Encoding StrictUtf8 = new(false, throwOnInvalidBytes: true);
        private ReadOnlySpan<byte> _rest = body;

        public byte U8() => Take(1)[0];
        public uint U32() => BinaryPrimitives.ReadUInt32LittleEndian(Take(4));
        public long I64() => BinaryPrimitives.ReadInt64LittleEndian(Take(8));

        public string Key()
        {
            int n = BinaryPrimitives.ReadUInt16LittleEndian(Take(2));
            if (n == 0 || n > IRendezvousStore.MaxKeyBytes) throw new ProtocolViolation($"key of {n} bytes (1 to {IRendezvousStore.MaxKeyBytes} allowed)");
            return Utf8(Take(n), "key");
        }

        public byte[] Value()
        {
            uint n = U32();
            if (n > IRendezvousStore.MaxValueBytes) throw new ProtocolViolation($"value of {n} bytes (at most {IRendezvousStore.MaxValueBytes})");
            return Take((int)n).ToArray();
        }

        public string Text() => Utf8(Take(BinaryPrimitives.ReadUInt16LittleEndian(Take(2))), "text");

        public readonly void End()
        {
            if (!_rest.IsEmpty) throw new ProtocolViolation($"{_rest.Length} unexpected bytes after the message");
        }

        private ReadOnlySpan<byte> Take(int n)
        {
            if (_rest.Length < n) throw new ProtocolViolation($"message ends early ({_rest.Length} bytes left, {n} needed)");
            var s = _rest[..n];
            _rest = _rest[n..];
            return s;
        }

        private static string Utf8(ReadOnlySpan<byte> bytes, string what)
        {
            try { return StrictUtf8.GetString(bytes); }
            catch (DecoderFallbackException) { throw new ProtocolViolation($"{what} is not valid UTF-8"); }
        }
    }
}

/// <summary>A peer broke the protocol; the message is the reason logged (and the connection is closed).</summary>
internal sealed class ProtocolViolation(string reason) : Exception(reason);
