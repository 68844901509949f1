// TCPStore check: TcpStoreClient against a real PyTorch TCPStore, on a host with torch installed. Not a test;
// bench/gpu/tcpstore_check.py drives it and asserts what the store holds afterwards.
//
//   TcpStoreCheck check TAG   one worker's half of a scripted exchange under MASTER_ADDR:MASTER_PORT and
//                             /worker/attempt_<TORCHELASTIC_RESTART_COUNT>, keys under TAG/; prints one JSON line
//   TcpStoreCheck torchrun    under `torchrun --no-python`: rank 0 publishes a 128-byte id, every rank reads it,
//                             all meet at a barrier; prints one JSON line per rank
//
// Values are sealed when MOE_RENDEZVOUS_SECRET is set. Exit code 0 when every step behaved as expected.
using System.Diagnostics;
using System.Text.Json;
using Moe.Runtime.Distributed.Rendezvous;

var env = (Func<string, string?>)Environment.GetEnvironmentVariable;
var secret = RendezvousSecret.FromEnvironment(env);
var result = new Dictionary<string, object?> { ["mode"] = args.FirstOrDefault(), ["sealed"] = secret is not null };
int exit = 0;
try
{
    using var store = TcpStoreClient.ConnectToTorchrunAgent(env, secret, TimeSpan.FromSeconds(30));
    result["endpoint"] = store.Endpoint;
    switch (args.FirstOrDefault())
    {
        case "check" when args.Length == 2:
            exit = Check(store, args[1], secret is not null, result);
            break;
        case "torchrun":
            exit = Torchrun(store, result);
            break;
        default:
            Console.Error.WriteLine("usage: TcpStoreCheck check TAG | TcpStoreCheck torchrun");
            return 2;
    }
}
catch (Exception e)
{
    result["error"] = e.ToString();
    exit = 1;
}
Console.WriteLine(JsonSerializer.Serialize(result));
return exit;

static int Check(IRendezvousStore store, string tag, bool sealedValues, Dictionary<string, object?> result)
{
    int failures = 0;
    void Expect(bool ok, string what)
    {
        if (!ok) { failures++; result[$"failed:{what}"] = true; }
    }

    // 1. A 128-byte blob (an NCCL id's size) for Python to read, plain or sealed.
    store.Set($"{tag}/from-dotnet", Enumerable.Range(0, 128).Select(i => (byte)i).ToArray());
    // 2. Counters: the server adds, as for torch's own workers.
    long first = store.Add($"{tag}/counter", 5), second = store.Add($"{tag}/counter", 2);
    result["add"] = new[] { first, second };
    Expect(first == 5 && second == 7, "add");
    // 3. A key nobody set: TryGet answers at once, Get times out, and the connection stays in step after the cancelled WAIT.
    result["try_missing"] = store.TryGet($"{tag}/missing", out _);
    Expect(!(bool)result["try_missing"]!, "try_missing");
    var clock = Stopwatch.StartNew();
    try
    {
        store.Get($"{tag}/missing", TimeSpan.FromMilliseconds(600));
        Expect(false, "timeout");
    }
    catch (RendezvousTimeoutException e)
    {
        result["timeout_ms"] = clock.ElapsedMilliseconds;
        result["timeout_message"] = e.Message;
    }
    long third = store.Add($"{tag}/counter", 1);
    Expect(third == 8, "add_after_timeout");
    // 4. Python sets this only after it has read our blob: a blocking Get across many WAIT slices.
    try
    {
        byte[] fromPython = store.Get($"{tag}/from-python", TimeSpan.FromSeconds(30));
        result["from_python"] = System.Text.Encoding.UTF8.GetString(fromPython);
        Expect(!sealedValues && result["from_python"] as string == "hello from python", "from_python");
    }
    catch (RendezvousException e) when (sealedValues)
    {
        // Python cannot seal: with a secret, its plain value must be refused, not used.
        result["from_python_refused"] = e.Message;
        Expect(e.Message.Contains("is not sealed"), "from_python_refused");
    }
    // 5. A barrier Python entered first (it added to the counter before starting us), so we open it.
    store.Barrier($"{tag}/b", 2, TimeSpan.FromSeconds(30));
    result["barrier"] = "passed";
    store.Set($"{tag}/done", "ok"u8);
    result["failures"] = failures;
    return failures == 0 ? 0 : 1;
}

static int Torchrun(IRendezvousStore store, Dictionary<string, object?> result)
{
    int rank = int.Parse(Environment.GetEnvironmentVariable("RANK") ?? "-1");
    int world = int.Parse(Environment.GetEnvironmentVariable("WORLD_SIZE") ?? "0");
    result["rank"] = rank;
    result["world"] = world;
    byte[] id = new byte[NcclUniqueId.Size];
    if (rank == 0)
    {
        new Random(11).NextBytes(id);
        NcclUniqueId.FromBytes(id).PublishTo(store);
    }
    NcclUniqueId.ReadFrom(store, TimeSpan.FromSeconds(30)).CopyTo(id);
    byte[] expected = new byte[NcclUniqueId.Size];
    new Random(11).NextBytes(expected);
    result["id_matches"] = id.AsSpan().SequenceEqual(expected); // compared, never printed
    store.Barrier("torchrun-check", world, TimeSpan.FromSeconds(30));
    result["barrier"] = "passed";
    return (bool)result["id_matches"]! ? 0 : 1;
}
