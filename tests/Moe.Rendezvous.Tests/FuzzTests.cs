using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using Moe.Runtime.Distributed.Rendezvous;
using static Moe.Runtime.Distributed.Rendezvous.RendezvousProtocol;

namespace Moe.Rendezvous.Tests;

/// <summary>
/// Thousands of mutated valid frames (seeded, so every run sends the same ones) against a server while four
/// ranks keep bootstrapping through it: the server must neither crash nor stall them. Two fuzzers, one after
/// the other: an unauthenticated one mutating handshakes, and one holding rank 4 of 5 that mutates requests
/// before sealing them (so the parser, not only the cipher, sees the damage) or the sealed frame itself.
/// </summary>
public class FuzzTests
{
    private const int HandshakeFrames = 600, SessionFrames = 1500;
    private static readonly TimeSpan ProbeTimeout = TimeSpan.FromSeconds(5);

    [Fact]
    public async Task MutatedFrames_NeitherCrashNorStallTheServer()
    {
        var secret = RendezvousSecret.Generate();
        var log = new LogCapture();
        var limits = new RendezvousLimits { HandshakeDeadline = TimeSpan.FromSeconds(1), FrameDeadline = TimeSpan.FromSeconds(1) };
        using var server = RendezvousServer.Start(IPAddress.Loopback, 0, 5, secret, log, limits);

        // Four ranks bootstrap round after round for as long as the fuzzing lasts; each round must finish promptly.
        using var fuzzing = new CancellationTokenSource();
        var rounds = new List<TimeSpan>();
        var job = OtherRank.Run(() =>
        {
            for (int round = 0; !fuzzing.IsCancellationRequested || round < 2; round++)
            {
                rounds.Add(Bootstrap.Run(server.Port, 4, 5, secret, $"round-{round}").Elapsed);
                fuzzing.Token.WaitHandle.WaitOne(100); // leave the two cores to the fuzzers between rounds
            }
        });

        var clock = Stopwatch.StartNew();
        int closedHandshakes = FuzzHandshakes(server.Port, secret, new Random(1));
        int reconnects = FuzzSession(server.Port, secret, new Random(2));
        fuzzing.Cancel();
        await job.WaitAsync(TimeSpan.FromSeconds(60), TestContext.Current.CancellationToken);

        Assert.True(rounds.Count >= 2, $"only {rounds.Count} bootstrap rounds ran during {clock.Elapsed} of fuzzing");
        Assert.True(rounds.Max() < TimeSpan.FromSeconds(5), $"a bootstrap round took {rounds.Max()} while fuzzed: {string.Join(", ", rounds)}");
        Assert.Equal(HandshakeFrames, closedHandshakes); // none left hanging
        Assert.True(log.Lines.Length > HandshakeFrames / 2, $"only {log.Lines.Length} refusals logged for {HandshakeFrames} mutated handshakes");
        Assert.True(reconnects > 0, "no mutated request was refused: the mutations are too gentle to test anything");
        Assert.DoesNotContain(log.Lines, l => l.Contains("internal error"));

        // Still serving: a fresh rank 4 joins and works.
        using var rank4 = RendezvousClient.Connect("127.0.0.1", server.Port, 4, 5, secret, TimeSpan.FromSeconds(5));
        rank4.Set("after-fuzz", [1, 2, 3]);
        Assert.Equal([1, 2, 3], rank4.Get("after-fuzz", TimeSpan.Zero));
    }

    /// <summary>
    /// Mutated HELLO frames (and, when a CHALLENGE comes back, mutated PROOFs), each connection then half-closed
    /// by us; returns how many the server closed within a second (all of them, unless it stalls).
    /// </summary>
    private static int FuzzHandshakes(int port, RendezvousSecret secret, Random random)
    {
        int closed = 0;
        for (int i = 0; i < HandshakeFrames; i++)
        {
            using var peer = RawPeer.Connect(port);
            byte[] hello = EncodeHello(4, 5, RandomNumberGenerator.GetBytes(NonceBytes));
            try
            {
                peer.SendRaw(Mutate(Framed(hello), random));
                byte[]? challenge = ReadOrNull(peer, TimeSpan.FromMilliseconds(10));
                if (challenge is { Length: 33 } && challenge[0] == Challenge)
                {
                    var keys = SessionKeys.Derive(secret, hello, challenge.AsSpan(1));
                    peer.SendRaw(Mutate(Framed(EncodeFixed(Proof, keys.ClientProof)), random));
                }
            }
            catch (SocketException) { /* the server closed first: counted below */ }
            try { peer.Socket.Shutdown(SocketShutdown.Send); } catch (SocketException) { }
            if (peer.ClosedByServer(TimeSpan.FromSeconds(1))) closed++;
        }
        return closed;
    }

    /// <summary>
    /// As rank 4: mutated requests, each followed by a probe (a TRYGET) that the server must answer within
    /// <see cref="ProbeTimeout"/> unless it closed the connection, in which case rank 4 joins again.
    /// Returns how many times it had to.
    /// </summary>
    private static int FuzzSession(int port, RendezvousSecret secret, Random random)
    {
        byte[][] valid =
        [
            new Writer(OpSet, 1).Key("fuzz/k"u8.ToArray()).Value(RandomNumberGenerator.GetBytes(16)).ToArray(),
            new Writer(OpGet, 2).Key("fuzz/k"u8.ToArray()).U32(0).ToArray(),
            new Writer(OpGet, 3).Key("fuzz/missing"u8.ToArray()).U32(50).ToArray(),
            new Writer(OpAdd, 4).Key("fuzz/counter"u8.ToArray()).I64(1).ToArray(),
            new Writer(OpGet, 5).Key("fuzz/counter"u8.ToArray()).U32(0).ToArray(),
        ];
        int reconnects = 0;
        RawPeer peer = JoinAsRank4(port, secret);
        try
        {
            for (int i = 0; i < SessionFrames; i++)
            {
                byte[] body = valid[random.Next(valid.Length)];
                // Four in five mutate the request (the parser sees it); one in five damages the sealed frame.
                byte[] frame = random.Next(5) < 4 ? peer.Sealer!.Seal(Mutate(body, random)) : Mutate(peer.Sealer!.Seal(body), random);
                uint probe = 0x7000_0000u + (uint)i;
                try
                {
                    peer.SendFrame(frame);
                    peer.SendFrame(peer.Sealer.Seal(new Writer(OpGet, probe).Key("fuzz/probe"u8.ToArray()).U32(0).ToArray()));
                }
                catch (SocketException) { /* closed while sending: seen below */ }
                if (!AnswersProbe(peer, probe))
                {
                    peer.Dispose();
                    peer = JoinAsRank4(port, secret);
                    reconnects++;
                }
            }
        }
        finally
        {
            peer.Dispose();
        }
        return reconnects;
    }

    /// <summary>True when the probe's answer arrives (other replies are skipped); false when the server closed the connection.</summary>
    private static bool AnswersProbe(RawPeer peer, uint probe)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            byte[]? sealedReply;
            try { sealedReply = peer.ReadFrame(ProbeTimeout); }
            catch (SocketException e) when (e.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock)
            {
                Assert.Fail($"the server neither answered a probe nor closed the connection within {ProbeTimeout}: it stalled");
                throw;
            }
            if (sealedReply is null) return false;
            byte[] reply = peer.Opener!.Open(sealedReply);
            if (reply.Length >= 5 && BinaryPrimitives.ReadUInt32LittleEndian(reply.AsSpan(1)) == probe) return true;
            Assert.True(clock.Elapsed < ProbeTimeout, "the probe's answer did not come");
        }
    }

    private static RawPeer JoinAsRank4(int port, RendezvousSecret secret)
    {
        // The server frees rank 4 when it has closed the previous connection, which may take a moment.
        var clock = Stopwatch.StartNew();
        while (true)
        {
            var peer = RawPeer.Connect(port);
            byte[]? answer = peer.Handshake(4, 5, secret, TimeSpan.FromSeconds(5));
            if (answer is not null && answer[0] == Welcome) return peer;
            peer.Dispose();
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), $"rank 4 could not join again (last answer: {(answer is null ? "closed" : Convert.ToHexString(answer))})");
            Thread.Sleep(5);
        }
    }

    private static byte[]? ReadOrNull(RawPeer peer, TimeSpan timeout)
    {
        try { return peer.ReadFrame(timeout); }
        catch (SocketException) { return null; }
        catch (ProtocolViolation) { return null; }
    }

    private static byte[] Framed(byte[] body)
    {
        byte[] frame = new byte[4 + body.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(frame, (uint)body.Length);
        body.CopyTo(frame, 4);
        return frame;
    }

    /// <summary>One to three of: flip a bit, set a byte, cut the tail, append bytes, write an extreme u16/u32 somewhere.</summary>
    internal static byte[] Mutate(byte[] input, Random random)
    {
        var b = new List<byte>(input);
        int count = random.Next(1, 4);
        for (int m = 0; m < count; m++)
        {
            if (b.Count == 0) { b.Add((byte)random.Next(256)); continue; }
            int at = random.Next(b.Count);
            switch (random.Next(6))
            {
                case 0: b[at] ^= (byte)(1 << random.Next(8)); break;
                case 1: b[at] = (byte)random.Next(256); break;
                case 2: b.RemoveRange(at, b.Count - at); break;
                case 3: for (int k = random.Next(1, 16); k > 0; k--) b.Add((byte)random.Next(256)); break;
                case 4:
                    ushort u16 = random.Next(3) switch { 0 => 0, 1 => ushort.MaxValue, _ => (ushort)random.Next(300) };
                    if (at + 2 <= b.Count) { b[at] = (byte)u16; b[at + 1] = (byte)(u16 >> 8); }
                    break;
                default:
                    uint u32 = random.Next(3) switch { 0 => 0u, 1 => uint.MaxValue, _ => (uint)random.Next(10_000) };
                    if (at + 4 <= b.Count) for (int k = 0; k < 4; k++) b[at + k] = (byte)(u32 >> (8 * k));
                    break;
            }
        }
        return [.. b];
    }
}
