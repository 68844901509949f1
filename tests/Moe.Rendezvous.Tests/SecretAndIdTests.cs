using System.Text.Json;
using Moe.Runtime;
using Moe.Runtime.Distributed.Rendezvous;

namespace Moe.Rendezvous.Tests;

public class SecretAndIdTests
{
    private static Func<string, string?> Env(params (string Name, string Value)[] vars) =>
        name => vars.FirstOrDefault(v => v.Name == name).Value;

    private static byte[] KeyOf(RendezvousSecret s) => s.DeriveKey("test");

    [Fact]
    public void HexAndBase64Forms_OfTheSameBytes_AreTheSameSecret()
    {
        byte[] bytes = Enumerable.Range(0, 32).Select(i => (byte)(i * 7 + 250)).ToArray();
        var hex = RendezvousSecret.Parse(Convert.ToHexString(bytes));
        var hexLower = RendezvousSecret.Parse(Convert.ToHexStringLower(bytes));
        var b64 = RendezvousSecret.Parse(Convert.ToBase64String(bytes));
        var b64Url = RendezvousSecret.Parse(Convert.ToBase64String(bytes).TrimEnd('=').Replace('+', '-').Replace('/', '_'));
        Assert.Equal(KeyOf(hex), KeyOf(hexLower));
        Assert.Equal(KeyOf(hex), KeyOf(b64));
        Assert.Equal(KeyOf(hex), KeyOf(b64Url));
        Assert.Equal(Convert.ToHexStringLower(bytes), hex.ToEnvironmentValue());
    }

    [Fact]
    public void ShortOrMalformedSecret_IsAUserErrorThatNeverRepeatsTheValue()
    {
        var shortOne = Assert.Throws<UserError>(() => RendezvousSecret.Parse("00112233445566778899aabbccddee")); // 15 bytes
        Assert.Equal("MOE_RENDEZVOUS_SECRET decodes to 15 bytes; at least 16 are needed (e.g. `openssl rand -hex 32`, 32 bytes).", shortOne.Message);
        var junk = Assert.Throws<UserError>(() => RendezvousSecret.Parse("not a secret at all!"));
        Assert.Equal("MOE_RENDEZVOUS_SECRET is neither hex nor base64 (20 characters). Use e.g. `openssl rand -hex 32` and give every rank the same value.", junk.Message);
        Assert.DoesNotContain("not a secret", junk.Message);
        Assert.Throws<UserError>(() => RendezvousSecret.FromEnvironment(Env(("MOE_RENDEZVOUS_SECRET", "zz"))));
    }

    [Fact]
    public void GeneratedSecret_RoundTripsThroughTheEnvironment_AndNeverPrints()
    {
        var s = RendezvousSecret.Generate();
        string exported = s.ToEnvironmentValue();
        Assert.Equal(64, exported.Length);
        var child = RendezvousSecret.FromEnvironment(Env(("MOE_RENDEZVOUS_SECRET", exported)))!;
        Assert.Equal(KeyOf(s), KeyOf(child));
        Assert.NotEqual(KeyOf(s), KeyOf(RendezvousSecret.Generate()));
        Assert.Equal("<rendezvous secret>", s.ToString());
        Assert.Equal("<rendezvous secret>", $"{s}");
        Assert.Equal("{}", JsonSerializer.Serialize(s));
    }

    [Fact]
    public void Resolve_PrefersTheVariable_ThenSlurmWithAWarning_ElseNone()
    {
        string hex = new('a', 64);
        var log = new StringWriter();
        var fromVar = RendezvousSecret.Resolve(Env(("MOE_RENDEZVOUS_SECRET", hex), ("SLURM_JOB_ID", "42")), log)!;
        Assert.Equal(KeyOf(RendezvousSecret.Parse(hex)), KeyOf(fromVar));
        Assert.Equal("", log.ToString());

        Assert.Null(RendezvousSecret.Resolve(Env(), log));
        Assert.Equal("", log.ToString());

        var slurm = Env(("SLURM_JOB_ID", "42"), ("SLURM_STEP_ID", "0"), ("SLURM_JOB_UID", "1000"));
        var a = RendezvousSecret.Resolve(slurm, log)!;
        var b = RendezvousSecret.FromSlurmJob(slurm, TextWriter.Null);
        var otherJob = RendezvousSecret.FromSlurmJob(Env(("SLURM_JOB_ID", "43"), ("SLURM_STEP_ID", "0"), ("SLURM_JOB_UID", "1000")), TextWriter.Null);
        Assert.Equal(KeyOf(a), KeyOf(b)); // every task of the step derives the same
        Assert.NotEqual(KeyOf(a), KeyOf(otherJob));
        string warning = Assert.Single(log.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.Equal("warning: MOE_RENDEZVOUS_SECRET is not set, so the rendezvous secret is derived from Slurm job 42, which anyone on the " +
                     "cluster can read: the rendezvous is protected only by obscurity. Run `export MOE_RENDEZVOUS_SECRET=$(openssl rand -hex 32)` " +
                     "before srun (srun passes it to every task).", warning);
    }

    [Fact]
    public void NcclUniqueId_NeverPrintsOrSerializesItsBytes()
    {
        byte[] bytes = Enumerable.Repeat((byte)0xAB, NcclUniqueId.Size).ToArray();
        var id = NcclUniqueId.FromBytes(bytes);
        Assert.Equal("<nccl unique id>", id.ToString());
        Assert.Equal("<nccl unique id>", $"{id}");
        Assert.Equal("{}", JsonSerializer.Serialize(id));
        byte[] copy = new byte[NcclUniqueId.Size];
        id.CopyTo(copy);
        Assert.Equal(bytes, copy);
        bytes[0] = 0; // the id keeps its own copy
        id.CopyTo(copy);
        Assert.Equal(0xAB, copy[0]);
        var e = Assert.Throws<ArgumentException>(() => NcclUniqueId.FromBytes(new byte[127]));
        Assert.StartsWith("an NCCL unique id is 128 bytes, not 127.", e.Message);
    }

    [Fact]
    public void NcclUniqueIdOfTheWrongSizeInTheStore_IsAnErrorNamingKeyAndSize()
    {
        var secret = RendezvousSecret.Generate();
        using var server = RendezvousServer.Start(System.Net.IPAddress.Loopback, 0, 1, secret, TextWriter.Null);
        using var store = RendezvousClient.Connect("127.0.0.1", server.Port, 0, 1, secret, TimeSpan.FromSeconds(5));
        store.Set(RendezvousKeys.NcclUniqueId, new byte[100]);
        var e = Assert.Throws<RendezvousException>(() => NcclUniqueId.ReadFrom(store, TimeSpan.FromSeconds(1)));
        Assert.Equal($"the value under 'nccl/unique-id' at the rendezvous server 127.0.0.1:{server.Port} is 100 bytes, not an NCCL unique id " +
                     "(128 bytes): another program uses this key or this store.", e.Message);
    }
}
