using System.Net;
using System.Net.Sockets;
using Moe.Runtime;
using Moe.Runtime.Distributed.Rendezvous;
using static Moe.Runtime.Distributed.Rendezvous.RendezvousProtocol;

namespace Moe.Rendezvous.Tests;

/// <summary>
/// Issue 21's "done when": on loopback, each kind of hostile or broken client is refused with a log line
/// naming it and the reason, while a 4-rank bootstrap over the same server completes on time.
/// </summary>
public class HostileClientTests
{
    private static readonly TimeSpan Handshake = TimeSpan.FromSeconds(3);
    private static readonly RendezvousLimits Limits = new() { HandshakeDeadline = Handshake, FrameDeadline = TimeSpan.FromSeconds(1) };

    [Fact]
    public void HostileCrowd_EachRefusedWithPeerAndReason_WhileFourRanksBootstrapOnTime()
    {
        var secret = RendezvousSecret.Generate();
        var log = new LogCapture();
        using var server = RendezvousServer.Start(IPAddress.Loopback, 0, 4, secret, log, Limits);
        var peers = new List<RawPeer>();
        try
        {
            // 200 idle connections that never say a word.
            for (int i = 0; i < 200; i++) peers.Add(RawPeer.Connect(server.Port));
            // Random bytes (seeded): their first four read as a length far beyond the handshake's 64 bytes.
            var random = RawPeer.Connect(server.Port);
            peers.Add(random);
            byte[] noise = new byte[1000];
            new Random(21).NextBytes(noise);
            random.SendRaw(noise);
            // A frame announcing 4 GB.
            var huge = RawPeer.Connect(server.Port);
            peers.Add(huge);
            huge.SendRaw([0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3]);
            // Half-open: a HELLO frame header for 50 bytes, then 10 of them, then silence.
            var halfOpen = RawPeer.Connect(server.Port);
            peers.Add(halfOpen);
            halfOpen.SendRaw([50, 0, 0, 0, Hello, .. "MOE-RDZV"u8, 1]);
            // A rank outside [0, 4), with the right secret.
            var outOfRange = RawPeer.Connect(server.Port);
            peers.Add(outOfRange);
            byte[]? reject = outOfRange.Handshake(7, 4, secret, TimeSpan.FromSeconds(5));
            Assert.Equal([Reject, (byte)RejectReason.RankOutOfRange, 4, 0, 0, 0], reject);
            // A client with another job's secret, through the real client.
            var wrongSecret = Assert.Throws<UserError>(() =>
                RendezvousClient.Connect("127.0.0.1", server.Port, 3, 4, RendezvousSecret.Generate(), TimeSpan.FromSeconds(5)));
            Assert.Contains($"127.0.0.1:{server.Port}", wrongSecret.Message);
            Assert.Contains("MOE_RENDEZVOUS_SECRET differs between ranks", wrongSecret.Message);

            // The job itself, with all of the above still connected; rank 2 also tries to join a second time.
            string? duplicateMessage = null;
            var (_, elapsed) = Bootstrap.Run(server.Port, 4, 4, secret, "crowd", (rank, _) =>
            {
                if (rank != 2) return;
                var e = Assert.Throws<UserError>(() =>
                    RendezvousClient.Connect("127.0.0.1", server.Port, 2, 4, secret, TimeSpan.FromSeconds(5)));
                duplicateMessage = e.Message;
            });
            Assert.True(elapsed < Handshake, $"the bootstrap took {elapsed}, longer than the idle connections' handshake deadline {Handshake}");
            Assert.DoesNotContain(log.Lines, l => l.Contains("did not complete the handshake")); // they were all still open
            Assert.Contains("rank 2 is already connected from another process", duplicateMessage);

            // Every one of them gets its own line naming it and the reason.
            string Refusal(RawPeer p) => $"rendezvous server {server.Endpoint}: refused {p.Name}: ";
            log.WaitForOne(l => l.StartsWith(Refusal(random)) && l.Contains("bytes announced; the handshake allows 1 to 64"), TimeSpan.FromSeconds(5));
            log.WaitForOne(l => l == Refusal(huge) + "frame of 4294967295 bytes announced; the handshake allows 1 to 64", TimeSpan.FromSeconds(5));
            log.WaitForOne(l => l == Refusal(outOfRange) + "claims rank 7, outside [0, 4)", TimeSpan.FromSeconds(5));
            log.WaitForOne(l => l.Contains(": refused 127.0.0.1:") && l.EndsWith("claims rank 3 but failed the secret check (not this job's, or its MOE_RENDEZVOUS_SECRET differs)"), TimeSpan.FromSeconds(5));
            log.WaitForOne(l => l.Contains(": refused 127.0.0.1:") && l.Contains(": claims rank 2, which 127.0.0.1:") && l.EndsWith(" already holds"), TimeSpan.FromSeconds(5));
            var deadlineLines = log.WaitFor(l => l.EndsWith("did not complete the handshake within 3 s (slow, idle or half-open client)"), 201, Handshake * 3);
            foreach (var p in peers.Take(200).Append(halfOpen))
                Assert.Single(deadlineLines, l => l.StartsWith(Refusal(p)));
            Assert.True(halfOpen.ClosedByServer(TimeSpan.FromSeconds(2)));
            Assert.DoesNotContain(log.Lines, l => l.Contains("internal error"));
            Assert.Equal(0, server.JoinedRanks);
        }
        finally
        {
            foreach (var p in peers) p.Dispose();
        }
    }

    [Fact]
    public void AuthenticatedRankStallingMidFrame_IsClosedAfterTheFrameDeadline_AndItsRankFreed()
    {
        var secret = RendezvousSecret.Generate();
        var log = new LogCapture();
        using var server = RendezvousServer.Start(IPAddress.Loopback, 0, 2, secret, log, Limits);
        using var peer = RawPeer.Connect(server.Port);
        Assert.Equal(Welcome, peer.Handshake(1, 2, secret, TimeSpan.FromSeconds(5))![0]);
        peer.SendRaw([100, 0, 0, 0, 1, 2, 3]); // a sealed frame of 100 bytes announced, 3 sent
        log.WaitForOne(l => l == $"rendezvous server {server.Endpoint}: refused rank 1 at {peer.Name}: started a frame and did not finish it within 1 s (half-open or stalled)", TimeSpan.FromSeconds(5));
        Assert.True(peer.ClosedByServer(TimeSpan.FromSeconds(2)));
        // Rank 1's slot is free again: the real rank 1 joins and works.
        using var rank1 = RendezvousClient.Connect("127.0.0.1", server.Port, 1, 2, secret, TimeSpan.FromSeconds(5));
        rank1.Set("k", [42]);
        Assert.Equal([42], rank1.Get("k", TimeSpan.FromSeconds(1)));
    }

    [Fact]
    public void AuthenticatedRankSendingAnUnknownRequestOrAForgedFrame_IsRefusedAndClosed()
    {
        var secret = RendezvousSecret.Generate();
        var log = new LogCapture();
        using var server = RendezvousServer.Start(IPAddress.Loopback, 0, 2, secret, log, Limits);

        using (var unknown = RawPeer.Connect(server.Port))
        {
            Assert.Equal(Welcome, unknown.Handshake(0, 2, secret, TimeSpan.FromSeconds(5))![0]);
            unknown.SendFrame(unknown.Sealer!.Seal([99, 1, 0, 0, 0]));
            log.WaitForOne(l => l == $"rendezvous server {server.Endpoint}: refused rank 0 at {unknown.Name}: unknown request type 99", TimeSpan.FromSeconds(5));
            Assert.True(unknown.ClosedByServer(TimeSpan.FromSeconds(2)));
        }
        using (var forged = RawPeer.Connect(server.Port))
        {
            Assert.Equal(Welcome, forged.Handshake(1, 2, secret, TimeSpan.FromSeconds(5))![0]);
            byte[] frame = forged.Sealer!.Seal(new Writer(OpSet, 1).Key("k"u8.ToArray()).Value([1]).ToArray());
            frame[^1] ^= 1; // one bit of the tag
            forged.SendFrame(frame);
            log.WaitForOne(l => l.StartsWith($"rendezvous server {server.Endpoint}: refused rank 1 at {forged.Name}: a frame failed authentication"), TimeSpan.FromSeconds(5));
            Assert.True(forged.ClosedByServer(TimeSpan.FromSeconds(2)));
        }
    }

    [Fact]
    public void ClientOfAnotherWorldSizeOrVersion_IsToldWhy()
    {
        var secret = RendezvousSecret.Generate();
        var log = new LogCapture();
        using var server = RendezvousServer.Start(IPAddress.Loopback, 0, 4, secret, log, Limits);
        var e = Assert.Throws<UserError>(() => RendezvousClient.Connect("127.0.0.1", server.Port, 1, 8, secret, TimeSpan.FromSeconds(5)));
        Assert.Equal($"the rendezvous server at 127.0.0.1:{server.Port} refused rank 1: this rank expects 8 ranks, the server's job has 4; WORLD_SIZE (or SLURM_NTASKS) differs between ranks.", e.Message);
        log.WaitForOne(l => l.EndsWith("rank 1 expects a world of 8 ranks; this job has 4"), TimeSpan.FromSeconds(5));

        using var old = RawPeer.Connect(server.Port);
        old.SendFrame(EncodeHello(1, 4, new byte[NonceBytes], version: 9));
        Assert.Equal([Reject, (byte)RejectReason.BadVersion, ProtocolVersion, 0, 0, 0], old.ReadFrame(TimeSpan.FromSeconds(5)));
        log.WaitForOne(l => l == $"rendezvous server {server.Endpoint}: refused {old.Name}: speaks protocol version 9; this server speaks 1 (mixed Moe builds)", TimeSpan.FromSeconds(5));
    }

    [Fact]
    public void PeerSendingOtherThanHello_GetsNoChallengeAndIsRefused()
    {
        var secret = RendezvousSecret.Generate();
        var log = new LogCapture();
        using var server = RendezvousServer.Start(IPAddress.Loopback, 0, 2, secret, log, Limits);
        using var peer = RawPeer.Connect(server.Port);
        // A request straight away, as if authenticated: answered with nothing but a closed connection.
        peer.SendFrame(new Writer(OpGet, 1).Key("nccl/unique-id"u8.ToArray()).U32(0).ToArray());
        Assert.Null(peer.ReadFrame(TimeSpan.FromSeconds(5)));
        log.WaitForOne(l => l == $"rendezvous server {server.Endpoint}: refused {peer.Name}: expected HELLO, got message type {OpGet}", TimeSpan.FromSeconds(5));
    }
}
