using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Text;
using Moe.Runtime;
using Moe.Runtime.Distributed.Rendezvous;

namespace Moe.Rendezvous.Tests;

/// <summary>
/// The torchrun store client. The byte sequences below are written by hand from the protocol (see
/// <see cref="FakeTcpStore"/> for the server side); the real check against torch 2.11's TCPStore is
/// bench/gpu/tcpstore_check.py on the GPU host.
/// </summary>
public class TcpStoreClientTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;
    private static readonly TimeSpan Second = TimeSpan.FromSeconds(1);
    private const string Prefix = "/worker/attempt_0";

    private static byte[] Hex(string hex) => Convert.FromHexString(hex.Replace(" ", ""));

    /// <summary>A string as torch sends it: u64 little-endian length, then the bytes.</summary>
    private static byte[] Str(string s) => [.. BitConverter.GetBytes((ulong)s.Length), .. Encoding.ASCII.GetBytes(s)];

    private static TcpStoreClient Client(FakeTcpStore store, RendezvousSecret? secret = null) =>
        TcpStoreClient.Connect("127.0.0.1", store.Port, Prefix, secret, TimeSpan.FromSeconds(5));

    [Fact]
    public void Queries_AreTheBytesTorchsClientSends()
    {
        Assert.Equal(Hex("00 CE F7 85 3C"), TcpStoreWire.Validate());
        Assert.Equal(Hex("0D 04 03 02 01"), TcpStoreWire.Ping(0x01020304));
        Assert.Equal(Hex("01 0200000000000000 2F61 0200000000000000 0102"), TcpStoreWire.Set("/a", [1, 2]));
        Assert.Equal(Hex("03 0200000000000000 2F61"), TcpStoreWire.Get("/a"));
        Assert.Equal(Hex("04 0200000000000000 2F63 FEFFFFFFFFFFFFFF"), TcpStoreWire.Add("/c", -2));
        Assert.Equal(Hex("05 0100000000000000 0200000000000000 2F61"), TcpStoreWire.Check("/a"));
        Assert.Equal(Hex("06 0200000000000000 0200000000000000 2F61 0200000000000000 2F62"), TcpStoreWire.Wait("/a", "/b"));
        Assert.Equal(Hex("0C"), TcpStoreWire.CancelWait());
        // PrefixStore("/worker/attempt_3") under TCPStore's own "/" prefix.
        Assert.Equal("//worker/attempt_3/nccl/unique-id", TcpStoreWire.WireKey(TcpStoreClient.TorchrunPrefix(3), "nccl/unique-id"));
    }

    [Fact]
    public void Session_SendsExactlyTheProtocolsBytes()
    {
        using var store = new FakeTcpStore();
        using (var client = Client(store))
        {
            client.Set("k", [1, 2]);
            Assert.True(client.TryGet("k", out byte[] got));
            Assert.Equal([1, 2], got);
            Assert.Equal(5, client.Add("c", 5));
            Assert.Equal([1, 2], client.Get("k", Second));
        }
        string k = "//worker/attempt_0/k", c = "//worker/attempt_0/c";
        byte[] pid = BitConverter.GetBytes((uint)Environment.ProcessId);
        byte[] expected =
        [
            0x00, 0xCE, 0xF7, 0x85, 0x3C,                          // VALIDATE 0x3C85F7CE
            0x0D, .. pid,                                          // PING with the pid as nonce
            0x01, .. Str(k), 2, 0, 0, 0, 0, 0, 0, 0, 1, 2,          // SET k [1 2]
            0x05, 1, 0, 0, 0, 0, 0, 0, 0, .. Str(k),               // CHECK [k]
            0x03, .. Str(k),                                       // GET k
            0x04, .. Str(c), 5, 0, 0, 0, 0, 0, 0, 0,               // ADD c 5
            0x06, 1, 0, 0, 0, 0, 0, 0, 0, .. Str(k),               // WAIT [k]: answered at once
            0x03, .. Str(k),                                       // GET k
        ];
        Assert.Equal(Convert.ToHexString(expected), Convert.ToHexString(store.Received(0)));
    }

    [Fact]
    public async Task Get_WaitsAcrossSlices_UntilATorchWorkerSetsTheKey()
    {
        using var store = new FakeTcpStore();
        using var ours = Client(store);
        var waiting = OtherRank.Run(() => ours.Get("late", TimeSpan.FromSeconds(10)));
        Thread.Sleep(700); // about three slices of 250 ms
        Assert.False(waiting.IsCompleted);
        // A Python worker's store.set("late", b"hi") through PrefixStore("/worker/attempt_0").
        using (var worker = new System.Net.Sockets.TcpClient("127.0.0.1", store.Port))
            worker.GetStream().Write([0x00, 0xCE, 0xF7, 0x85, 0x3C, 0x01, .. Str("//worker/attempt_0/late"), 2, 0, 0, 0, 0, 0, 0, 0, .. "hi"u8]);
        Assert.Equal("hi"u8.ToArray(), await waiting.WaitAsync(TimeSpan.FromSeconds(5), Ct));
    }

    [Fact]
    public void Get_TimesOutNamingKeyAndStore_AndLeavesTheConnectionInStep()
    {
        using var store = new FakeTcpStore();
        using var client = Client(store);
        var clock = Stopwatch.StartNew();
        var e = Assert.Throws<RendezvousTimeoutException>(() => client.Get("nccl/unique-id", TimeSpan.FromMilliseconds(600)));
        Assert.InRange(clock.Elapsed, TimeSpan.FromMilliseconds(600), TimeSpan.FromSeconds(5));
        Assert.Matches($@"^waited \d+ ms for key 'nccl/unique-id' at the torchrun store 127\.0\.0\.1:{store.Port} \(as '//worker/attempt_0/nccl/unique-id'\)", e.Message);
        // Every WAIT was cancelled and its WAIT_CANCELED read: the next answers line up.
        Assert.Equal(3, client.Add("c", 3));
        client.Set("k", [9]);
        Assert.Equal([9], client.Get("k", Second));
    }

    [Fact]
    public async Task StopWaitingThatCrossesTheCancel_MeansTheKeyIsThere()
    {
        using var store = new FakeTcpStore { CrossStopWaitingWithCancel = true };
        using var client = Client(store);
        var waiting = OtherRank.Run(() => client.Get("k", TimeSpan.FromSeconds(5)));
        Thread.Sleep(100);
        store.PutQuietly("//worker/attempt_0/k", [7]); // present, but this WAIT is never woken
        Assert.Equal([7], await waiting.WaitAsync(TimeSpan.FromSeconds(5), Ct));
        Assert.Equal(1, client.Add("after", 1)); // still in step: the 0 and the 1 were both consumed
    }

    [Fact]
    public async Task WatchdogTryGet_GetsThroughWithinASliceWhileGetWaits()
    {
        using var store = new FakeTcpStore();
        using var client = Client(store);
        var main = OtherRank.Run(() => client.Get("never", TimeSpan.FromSeconds(3)));
        Thread.Sleep(100);
        var clock = Stopwatch.StartNew();
        Assert.False(client.TryGetAbort(out _));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(2), $"TryGet took {clock.Elapsed} while Get waited");
        await Assert.ThrowsAsync<RendezvousTimeoutException>(() => main.WaitAsync(TimeSpan.FromSeconds(10), Ct));
    }

    [Fact]
    public async Task Barrier_OverTheTorchStore_ReleasesBoth()
    {
        using var store = new FakeTcpStore();
        using var a = Client(store);
        using var b = Client(store);
        var other = OtherRank.Run(() => b.Barrier("start", 2, TimeSpan.FromSeconds(30)));
        a.Barrier("start", 2, TimeSpan.FromSeconds(30));
        await other.WaitAsync(TimeSpan.FromSeconds(5), Ct);
        Assert.Equal("2"u8.ToArray(), store.Stored("//worker/attempt_0/barrier/start/arrived"));
    }

    [Fact]
    public void WithASecret_ValuesAreSealed_AndOnlyTheSameSecretOpensThem()
    {
        using var store = new FakeTcpStore();
        var secret = RendezvousSecret.Generate();
        byte[] id = new byte[NcclUniqueId.Size];
        new Random(3).NextBytes(id);
        using var rank0 = Client(store, secret);
        NcclUniqueId.FromBytes(id).PublishTo(rank0);
        Assert.True(rank0.TryGet(RendezvousKeys.NcclUniqueId, out _)); // SET has no reply: a round trip orders it before we look

        byte[] stored = store.Stored("//worker/attempt_0/nccl/unique-id")!;
        Assert.Equal("MOES"u8.ToArray(), stored[..4]);
        Assert.Equal(id.Length + 4 + 1 + 12 + 16, stored.Length);
        Assert.False(stored.AsSpan().IndexOf(id.AsSpan(0, 8)) >= 0, "the id's bytes are readable in the store");

        using var rank1 = Client(store, RendezvousSecret.Parse(secret.ToEnvironmentValue()));
        byte[] read = new byte[NcclUniqueId.Size];
        NcclUniqueId.ReadFrom(rank1, Second).CopyTo(read);
        Assert.Equal(id, read);

        using var stranger = Client(store, RendezvousSecret.Generate());
        var wrong = Assert.Throws<RendezvousException>(() => stranger.Get(RendezvousKeys.NcclUniqueId, Second));
        Assert.Equal($"the value under 'nccl/unique-id' at the torchrun store 127.0.0.1:{store.Port} failed authentication: it was sealed " +
                     "with a different MOE_RENDEZVOUS_SECRET or altered by another process.", wrong.Message);
        using var plain = Client(store);
        var noSecret = Assert.Throws<RendezvousException>(() => plain.Get(RendezvousKeys.NcclUniqueId, Second));
        Assert.Contains("is sealed with a job secret, but this rank has no MOE_RENDEZVOUS_SECRET", noSecret.Message);

        // A sealed value copied under another key does not open: the key is bound to it.
        store.PutQuietly("//worker/attempt_0/copy", stored);
        Assert.Throws<RendezvousException>(() => rank1.Get("copy", Second));
        // A plain value where a sealed one is expected is refused, not used.
        plain.Set("abort", "rank 9: forged"u8);
        Assert.True(plain.TryGetAbort(out _));
        var forged = Assert.Throws<RendezvousException>(() => rank1.TryGetAbort(out _));
        Assert.Contains("is not sealed: the rank that wrote it runs without MOE_RENDEZVOUS_SECRET", forged.Message);
    }

    [Fact]
    public void ConnectToTorchrunAgent_ReadsTheWorkersEnvironment()
    {
        using var store = new FakeTcpStore();
        Func<string, string?> Env(params (string, string)[] vars) => name => vars.FirstOrDefault(v => v.Item1 == name).Item2;
        using (var client = TcpStoreClient.ConnectToTorchrunAgent(Env(("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", store.Port.ToString()),
                   ("TORCHELASTIC_RESTART_COUNT", "2"), ("TORCHELASTIC_USE_AGENT_STORE", "True")), null, TimeSpan.FromSeconds(5)))
        {
            client.Set("x", [1]);
            Assert.True(client.TryGet("x", out _));
            Assert.Equal($"torchrun store 127.0.0.1:{store.Port}", client.Endpoint);
        }
        Assert.Equal([1], store.Stored("//worker/attempt_2/x"));
        Assert.Throws<InvalidOperationException>(() => TcpStoreClient.ConnectToTorchrunAgent(
            Env(("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")), null, Second));
        var badPort = Assert.Throws<UserError>(() => TcpStoreClient.ConnectToTorchrunAgent(
            Env(("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500x"), ("TORCHELASTIC_USE_AGENT_STORE", "True")), null, Second));
        Assert.Equal("MASTER_PORT '29500x' is not a port number (1 to 65535).", badPort.Message);
    }

    [Fact]
    public void ConnectToOurOwnServer_SaysItIsNotTorchrunsStore()
    {
        var log = new LogCapture();
        using var server = RendezvousServer.Start(IPAddress.Loopback, 0, 1, RendezvousSecret.Generate(), log);
        var e = Assert.Throws<UserError>(() => TcpStoreClient.Connect("127.0.0.1", server.Port, Prefix, null, TimeSpan.FromSeconds(5)));
        Assert.Equal($"the peer at 127.0.0.1:{server.Port} did not answer a TCPStore ping (it closed the connection): it is not torchrun's " +
                     "store (a Moe rendezvous server needs RendezvousClient).", e.Message);
        // VALIDATE's first four bytes, 00 CE F7 85, read as our frame length 0x85F7CE00.
        log.WaitForOne(l => l.EndsWith($": frame of {0x85F7CE00u} bytes announced; the handshake allows 1 to 64"), TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task APeerThatClosesWithThePingUnread_ResetsTheConnection_AndIsReportedAsClosed()
    {
        using var listener = new System.Net.Sockets.TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        int port = ((IPEndPoint)listener.LocalEndpoint).Port;
        var peer = OtherRank.Run(() =>
        {
            using var s = listener.AcceptSocket();
            var clock = Stopwatch.StartNew();
            while (s.Available < 10 && clock.Elapsed < TimeSpan.FromSeconds(10)) Thread.Sleep(5); // VALIDATE and PING
            Assert.Equal(10, s.Available);
            s.Close(); // closing with unread bytes sends a reset, not an orderly end
        });
        var e = Assert.Throws<UserError>(() => TcpStoreClient.Connect("127.0.0.1", port, Prefix, null, TimeSpan.FromSeconds(10)));
        await peer.WaitAsync(TimeSpan.FromSeconds(10), Ct);
        Assert.Equal($"the peer at 127.0.0.1:{port} did not answer a TCPStore ping (it closed the connection): it is not torchrun's " +
                     "store (a Moe rendezvous server needs RendezvousClient).", e.Message);
    }

    [Fact]
    public void ConnectToAClosedPort_FailsWithinItsDeadlineNamingAddressAndPort()
    {
        int port;
        using (var probe = new System.Net.Sockets.TcpListener(IPAddress.Loopback, 0)) { probe.Start(); port = ((IPEndPoint)probe.LocalEndpoint).Port; }
        var clock = Stopwatch.StartNew();
        var e = Assert.Throws<UserError>(() => TcpStoreClient.Connect("127.0.0.1", port, Prefix, null, Second));
        Assert.InRange(clock.Elapsed, Second, TimeSpan.FromSeconds(4));
        Assert.Equal($"no torchrun store answered at 127.0.0.1:{port} within 1 s (last attempt: ConnectionRefused); check MASTER_ADDR and MASTER_PORT.", e.Message);
    }
}
