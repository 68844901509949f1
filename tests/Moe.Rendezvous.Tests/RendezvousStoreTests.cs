using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Moe.Runtime;
using Moe.Runtime.Distributed.Rendezvous;
using static Moe.Runtime.Distributed.Rendezvous.RendezvousProtocol;

namespace Moe.Rendezvous.Tests;

/// <summary>The store's behaviour for well-behaved ranks: waits, timeouts, counters, barriers, abort, shutdown, and start-up errors.</summary>
public sealed class RendezvousStoreTests : IDisposable
{
    private readonly RendezvousSecret _secret = RendezvousSecret.Generate();
    private readonly LogCapture _log = new();
    private readonly RendezvousServer _server;

    public RendezvousStoreTests() => _server = RendezvousServer.Start(IPAddress.Loopback, 0, 2, _secret, _log);

    public void Dispose() => _server.Dispose();

    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private RendezvousClient Join(int rank) => RendezvousClient.Connect("127.0.0.1", _server.Port, rank, 2, _secret, TimeSpan.FromSeconds(5));

    [Fact]
    public void GetOfAKeyNobodySets_TimesOutNamingKeyServerAndTimeWaited()
    {
        using var rank1 = Join(1);
        var clock = Stopwatch.StartNew();
        var e = Assert.Throws<RendezvousTimeoutException>(() => rank1.Get("nccl/unique-id", TimeSpan.FromMilliseconds(300)));
        Assert.InRange(clock.Elapsed, TimeSpan.FromMilliseconds(300), TimeSpan.FromSeconds(5));
        Assert.Matches(
            $@"^rank 1 waited \d+ ms for key 'nccl/unique-id' at the rendezvous server 127\.0\.0\.1:{_server.Port}; no rank set it in that time",
            e.Message);
        // The connection is still good afterwards.
        rank1.Set("after", [7]);
        Assert.Equal([7], rank1.Get("after", TimeSpan.Zero));
    }

    [Fact]
    public async Task BlockingGet_IsWokenBySetFromAnotherRank()
    {
        using var rank0 = Join(0);
        using var rank1 = Join(1);
        var waiting = OtherRank.Run(() => rank1.Get("late", TimeSpan.FromSeconds(10)));
        Thread.Sleep(100);
        Assert.False(waiting.IsCompleted);
        rank0.Set("late", "here"u8);
        Assert.Equal("here"u8.ToArray(), await waiting.WaitAsync(TimeSpan.FromSeconds(5), Ct));
    }

    [Fact]
    public async Task WatchdogTryGet_IsAnsweredWhileTheMainThreadBlocks_AndSeesTheAbortReason()
    {
        using var rank0 = Join(0);
        using var rank1 = Join(1);
        var main = Task.Factory.StartNew(() => rank0.Get("never-set-until-later", TimeSpan.FromSeconds(20)), Ct,
            TaskCreationOptions.LongRunning, TaskScheduler.Default);
        Thread.Sleep(200); // the Get is parked on the server by now
        // The watchdog's polls on the same client are answered while the Get waits (were they queued behind
        // it, each would take the Get's 20 s).
        var clock = Stopwatch.StartNew();
        for (int i = 0; i < 5; i++) Assert.False(rank0.TryGetAbort(out _));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"5 polls took {clock.Elapsed} while the main thread waited");
        rank1.RaiseAbort(1, "CUDA error: an illegal memory access was encountered");
        Assert.True(rank0.TryGetAbort(out string reason));
        Assert.Equal("rank 1: CUDA error: an illegal memory access was encountered", reason);
        Assert.False(main.IsCompleted);
        rank1.Set("never-set-until-later", [1]);
        Assert.Equal([1], await main.WaitAsync(TimeSpan.FromSeconds(10), Ct));
    }

    [Fact]
    public void AnAbortReasonLongerThanTheLimit_IsCutAtACharacterBoundary()
    {
        using var rank0 = Join(0);
        rank0.RaiseAbort(0, new string('é', 2000)); // two bytes each
        Assert.True(rank0.TryGetAbort(out string reason));
        Assert.True(Encoding.UTF8.GetByteCount(reason) <= RendezvousKeys.MaxAbortReasonBytes);
        Assert.StartsWith("rank 0: éé", reason);
        Assert.EndsWith("é…", reason);
    }

    [Fact]
    public void Add_CountsAcrossRanks_AndKeepsDecimalTextAsTorchDoes()
    {
        using var rank0 = Join(0);
        using var rank1 = Join(1);
        Assert.Equal(1, rank0.Add("c", 1));
        Assert.Equal(6, rank1.Add("c", 5));
        Assert.Equal(4, rank0.Add("c", -2));
        Assert.Equal("4"u8.ToArray(), rank1.Get("c", TimeSpan.Zero));
        rank0.Set("text", "abc"u8);
        var e = Assert.Throws<RendezvousException>(() => rank0.Add("text", 1));
        Assert.Equal($"the rendezvous server at 127.0.0.1:{_server.Port} refused ADD 'text': key 'text' holds a value that is not a counter", e.Message);
    }

    [Fact]
    public async Task Barrier_ReleasesBothRanks_ReusedNameIsAnError_TimeoutSaysWhoArrived()
    {
        using var rank0 = Join(0);
        using var rank1 = Join(1);
        var other = OtherRank.Run(() => rank1.Barrier("start", 2, TimeSpan.FromSeconds(30)));
        rank0.Barrier("start", 2, TimeSpan.FromSeconds(30));
        await other.WaitAsync(TimeSpan.FromSeconds(5), Ct);

        var reused = Assert.Throws<RendezvousException>(() => rank0.Barrier("start", 2, TimeSpan.FromSeconds(1)));
        Assert.StartsWith($"barrier 'start' at the rendezvous server 127.0.0.1:{_server.Port} was entered 3 times for 2 parties", reused.Message);

        var alone = Assert.Throws<RendezvousTimeoutException>(() => rank0.Barrier("end", 2, TimeSpan.FromMilliseconds(300)));
        Assert.StartsWith($"barrier 'end' at the rendezvous server 127.0.0.1:{_server.Port} timed out after 300 ms: 1 of 2 ranks arrived", alone.Message);
    }

    [Fact]
    public void OversizedKeyOrValue_IsRefusedBeforeAnythingIsSent()
    {
        using var rank0 = Join(0);
        Assert.Throws<ArgumentException>(() => rank0.Set(new string('k', 300), [1]));
        Assert.Throws<ArgumentException>(() => rank0.Set("k", new byte[IRendezvousStore.MaxValueBytes + 1]));
        rank0.Set("k", new byte[IRendezvousStore.MaxValueBytes]);
        Assert.Equal(IRendezvousStore.MaxValueBytes, rank0.Get("k", TimeSpan.Zero).Length);
    }

    [Fact]
    public async Task ServerDispose_ReleasesAWaitingRankWithTheReason()
    {
        using var rank1 = Join(1);
        var waiting = OtherRank.Run(() => rank1.Get("never", TimeSpan.FromSeconds(30)));
        Thread.Sleep(100);
        var clock = Stopwatch.StartNew();
        _server.Dispose();
        var inner = await Assert.ThrowsAsync<RendezvousException>(() => waiting.WaitAsync(TimeSpan.FromSeconds(10), Ct));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), $"the waiting rank was released after {clock.Elapsed}");
        Assert.Equal($"the rendezvous server at 127.0.0.1:{_server.Port} shut down (rank 0's process is exiting).", inner.Message);
        Assert.Throws<RendezvousException>(() => rank1.TryGet("x", out _));
    }

    [Fact]
    public void ConnectToAClosedPort_FailsWithinItsDeadlineNamingAddressAndPort()
    {
        int port = FreePort();
        var clock = Stopwatch.StartNew();
        var e = Assert.Throws<UserError>(() => RendezvousClient.Connect("127.0.0.1", port, 1, 2, _secret, TimeSpan.FromSeconds(1)));
        Assert.InRange(clock.Elapsed, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(4));
        Assert.StartsWith($"no rendezvous server answered at 127.0.0.1:{port} within 1 s (last attempt: ConnectionRefused", e.Message);
        Assert.Contains("MASTER_ADDR and MASTER_PORT", e.Message);
    }

    [Fact]
    public void ConnectToAPeerThatNeverAnswers_FailsWithinItsDeadlineSayingSo()
    {
        using var silent = new TcpListener(IPAddress.Loopback, 0);
        silent.Start();
        int port = ((IPEndPoint)silent.LocalEndpoint).Port;
        var clock = Stopwatch.StartNew();
        var e = Assert.Throws<UserError>(() => RendezvousClient.Connect("127.0.0.1", port, 0, 2, _secret, TimeSpan.FromSeconds(1)));
        Assert.InRange(clock.Elapsed, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(4));
        Assert.StartsWith($"no rendezvous server answered at 127.0.0.1:{port} within 1 s (last attempt: connected, but no answer to the handshake", e.Message);
    }

    [Fact]
    public async Task ServerThatCannotProveTheSecret_IsNotTrusted()
    {
        using var impostor = new TcpListener(IPAddress.Loopback, 0);
        impostor.Start();
        int port = ((IPEndPoint)impostor.LocalEndpoint).Port;
        var serve = OtherRank.Run(() =>
        {
            using var s = impostor.AcceptSocket();
            s.ReceiveTimeout = 5000;
            RendezvousClient.ReadFrame(s, MaxHandshakeFrame);            // HELLO
            RendezvousClient.WriteFrame(s, EncodeFixed(Challenge, new byte[NonceBytes]));
            RendezvousClient.ReadFrame(s, MaxHandshakeFrame);            // PROOF: an HMAC, which reveals nothing
            RendezvousClient.WriteFrame(s, EncodeFixed(Welcome, new byte[MacBytes]));
            Thread.Sleep(200);
        });
        var e = Assert.Throws<UserError>(() => RendezvousClient.Connect("127.0.0.1", port, 0, 2, _secret, TimeSpan.FromSeconds(5)));
        Assert.Equal($"the peer at 127.0.0.1:{port} answered the rendezvous handshake but could not prove it knows this job's secret: " +
                     "it is not this job's rendezvous server (another job on the same MASTER_PORT?).", e.Message);
        await serve.WaitAsync(TimeSpan.FromSeconds(5), Ct);
    }

    [Fact]
    public void StartOnAPortInUse_NamesAddressAndPort()
    {
        var e = Assert.Throws<UserError>(() => RendezvousServer.Start(IPAddress.Loopback, _server.Port, 2, _secret, TextWriter.Null));
        Assert.Equal($"cannot start the rendezvous server at 127.0.0.1:{_server.Port}: the port is already in use (another job, or a process " +
                     "left from an earlier run); choose another MASTER_PORT or stop that process.", e.Message);
    }

    [Fact]
    public void StartOnAnAddressNotOfThisHost_SaysSo()
    {
        // 192.0.2.1 is TEST-NET-1 (RFC 5737): bind fails locally, nothing is sent anywhere.
        var e = Assert.Throws<UserError>(() => RendezvousServer.Start(IPAddress.Parse("192.0.2.1"), 0, 2, _secret, TextWriter.Null));
        Assert.Equal("cannot start the rendezvous server at 192.0.2.1:0: 192.0.2.1 is not an address of this host; MASTER_ADDR must name the host where rank 0 runs.", e.Message);
    }

    [Fact]
    public void StartOnAllInterfaces_IsRefused()
    {
        var e = Assert.Throws<ArgumentException>(() => RendezvousServer.Start(IPAddress.Any, 0, 2, _secret, TextWriter.Null));
        Assert.StartsWith("the rendezvous server binds the one address MASTER_ADDR names, not 0.0.0.0 (all interfaces)", e.Message);
    }

    [Fact]
    public void BindAddressFor_TakesLiteralsAndLocalNames()
    {
        Assert.Equal(IPAddress.Parse("10.1.2.3"), RendezvousServer.BindAddressFor("10.1.2.3"));
        Assert.True(IPAddress.IsLoopback(RendezvousServer.BindAddressFor("localhost")));
    }

    [Fact]
    public void NothingTheServerLogs_ContainsAValueOrTheSecret()
    {
        byte[] id = new byte[NcclUniqueId.Size];
        new Random(5).NextBytes(id);
        using (var rank0 = Join(0))
        {
            NcclUniqueId.FromBytes(id).PublishTo(rank0);
            using var impostor = RawPeer.Connect(_server.Port);
            Assert.Equal([Reject, (byte)RejectReason.DuplicateRank, 0, 0, 0, 0], impostor.Handshake(0, 2, _secret, TimeSpan.FromSeconds(5)));
            _log.WaitForOne(l => l.Contains("claims rank 0"), TimeSpan.FromSeconds(5));
        }
        string all = string.Join("\n", _log.Lines);
        Assert.DoesNotContain(Convert.ToHexString(id), all, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain(Convert.ToBase64String(id), all);
        Assert.DoesNotContain(_secret.ToEnvironmentValue(), all);
    }

    private static int FreePort()
    {
        using var probe = new TcpListener(IPAddress.Loopback, 0);
        probe.Start();
        return ((IPEndPoint)probe.LocalEndpoint).Port;
    }
}
