using System.Security.Cryptography;
using System.Text;

namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// The per-job secret every rank proves to the rendezvous server (and the server to every rank) before
/// anything else is exchanged. It never crosses the wire: both sides derive keys from it (HKDF-SHA256)
/// and show HMACs over fresh nonces. See docs/distributed-security.md for the trust model.
/// </summary>
/// <remarks>
/// Where it comes from, in <see cref="Resolve"/>'s order:
/// <list type="number">
/// <item><c>MOE_RENDEZVOUS_SECRET</c>, hex (an even number of hex digits, nothing else) or base64, at least
/// <see cref="MinBytes"/> bytes decoded. Our launcher sets it for its children from <see cref="Generate"/>;
/// a user sets it once before <c>srun</c> or before starting nodes by hand.</item>
/// <item>Under Slurm without the variable: a derivation from the job's identity (job and step id, user id,
/// cluster, start time). Slurm hands its tasks nothing a stranger cannot read (<c>squeue</c> shows job ids),
/// so this only keeps a different job, or a mistyped port, out; it is protected by obscurity, and
/// <see cref="FromSlurmJob"/> says so in a one-line warning with the fix.</item>
/// <item>Otherwise none (<c>null</c>): our launcher generates one; any other launch must ask for the
/// variable (<see cref="MissingMessage"/>).</item>
/// </list>
/// The value is never logged: <see cref="ToString"/> returns a placeholder, and only
/// <see cref="ToEnvironmentValue"/> (for the launcher's child environment) gives the text.
/// </remarks>
public sealed class RendezvousSecret
{
    /// <summary>The environment variable that carries the secret to every rank.</summary>
    public const string EnvironmentVariable = "MOE_RENDEZVOUS_SECRET";

    /// <summary>Fewest bytes a secret may have (128 bits).</summary>
    public const int MinBytes = 16;

    /// <summary>Bytes <see cref="Generate"/> draws.</summary>
    public const int GeneratedBytes = 32;

    /// <summary>What a launch without any source of a secret tells the user.</summary>
    public const string MissingMessage =
        EnvironmentVariable + " is not set: a job started without Moe's own launcher needs the same secret on every rank " +
        "so that only its ranks can join the rendezvous. Set it before starting the ranks, e.g. " +
        "`export " + EnvironmentVariable + "=$(openssl rand -hex 32)`.";

    private readonly byte[] _bytes;

    private RendezvousSecret(byte[] bytes) => _bytes = bytes;

    /// <summary>A new random secret (<see cref="GeneratedBytes"/> bytes from the OS's CSPRNG), for our launcher to export to its children.</summary>
    public static RendezvousSecret Generate() => new(RandomNumberGenerator.GetBytes(GeneratedBytes));

    /// <summary>
    /// Parses hex (an even count of hex digits and nothing else) or base64 (standard or URL-safe, padding
    /// optional). A value that is neither, or decodes to fewer than <see cref="MinBytes"/> bytes, is a
    /// <see cref="UserError"/> naming <paramref name="source"/> and the fix; the message never repeats the value.
    /// </summary>
    public static RendezvousSecret Parse(string text, string source = EnvironmentVariable)
    {
        string s = text.Trim();
        byte[]? bytes = IsHex(s) ? Convert.FromHexString(s) : TryBase64(s);
        if (bytes is null)
            throw new UserError(
                $"{source} is neither hex nor base64 ({s.Length} characters). Use e.g. `openssl rand -hex 32` " +
                "and give every rank the same value.");
        if (bytes.Length < MinBytes)
            throw new UserError(
                $"{source} decodes to {bytes.Length} bytes; at least {MinBytes} are needed (e.g. `openssl rand -hex 32`, 32 bytes).");
        return new RendezvousSecret(bytes);
    }

    /// <summary>The secret in <see cref="EnvironmentVariable"/>, or null when it is unset or empty; malformed is a <see cref="UserError"/>.</summary>
    public static RendezvousSecret? FromEnvironment(Func<string, string?> getEnv)
    {
        string? value = getEnv(EnvironmentVariable);
        return string.IsNullOrWhiteSpace(value) ? null : Parse(value);
    }

    /// <summary>
    /// A secret every task of one Slurm job step derives alike from the job's identity, with a one-line
    /// warning on <paramref name="log"/> that it is only as secret as the job id (pass
    /// <see cref="TextWriter.Null"/> on all ranks but 0, so the warning is printed once).
    /// </summary>
    public static RendezvousSecret FromSlurmJob(Func<string, string?> getEnv, TextWriter log)
    {
        string jobId = getEnv("SLURM_JOB_ID") ?? throw new InvalidOperationException("SLURM_JOB_ID is not set: not a Slurm task.");
        // Every task of one step sees the same values; missing ones read as empty on all tasks alike.
        string[] parts = ["SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_JOB_UID", "SLURM_CLUSTER_NAME", "SLURM_JOB_START_TIME"];
        string identity = string.Join("\n", parts.Select(p => $"{p}={getEnv(p) ?? ""}"));
        byte[] key = HKDF.DeriveKey(HashAlgorithmName.SHA256, Encoding.UTF8.GetBytes(identity), GeneratedBytes,
            salt: [], info: Encoding.UTF8.GetBytes("moe rendezvous v1 slurm job"));
        log.WriteLine(
            $"warning: {EnvironmentVariable} is not set, so the rendezvous secret is derived from Slurm job {jobId}, which " +
            "anyone on the cluster can read: the rendezvous is protected only by obscurity. Run " +
            $"`export {EnvironmentVariable}=$(openssl rand -hex 32)` before srun (srun passes it to every task).");
        return new RendezvousSecret(key);
    }

    /// <summary>
    /// <see cref="FromEnvironment"/>, else <see cref="FromSlurmJob"/> when SLURM_JOB_ID is set, else null
    /// (our launcher then calls <see cref="Generate"/>; other launches fail with <see cref="MissingMessage"/>).
    /// </summary>
    public static RendezvousSecret? Resolve(Func<string, string?> getEnv, TextWriter log) =>
        FromEnvironment(getEnv) ?? (string.IsNullOrEmpty(getEnv("SLURM_JOB_ID")) ? null : FromSlurmJob(getEnv, log));

    /// <summary>The secret as lowercase hex, for the launcher to put in its children's <see cref="EnvironmentVariable"/>. Never log it.</summary>
    public string ToEnvironmentValue() => Convert.ToHexStringLower(_bytes);

    /// <summary>A placeholder: the secret is never printed.</summary>
    public override string ToString() => "<rendezvous secret>";

    /// <summary>A 32-byte key for one purpose (HKDF-SHA256 with the purpose as info), so that no key serves two protocols.</summary>
    internal byte[] DeriveKey(string purpose) =>
        HKDF.DeriveKey(HashAlgorithmName.SHA256, _bytes, 32, salt: [], info: Encoding.UTF8.GetBytes(purpose));

    private static bool IsHex(string s) => s.Length > 0 && s.Length % 2 == 0 && s.All(char.IsAsciiHexDigit);

    private static byte[]? TryBase64(string s)
    {
        string standard = s.Replace('-', '+').Replace('_', '/');
        standard = standard.PadRight(standard.Length + (4 - standard.Length % 4) % 4, '=');
        byte[] buffer = new byte[standard.Length];
        return s.Length > 0 && Convert.TryFromBase64String(standard, buffer, out int written) ? buffer[..written] : null;
    }
}
