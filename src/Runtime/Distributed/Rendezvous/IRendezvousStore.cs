using System.Text;

namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// The small host-side store every rank of a job shares during start-up and shutdown: the NCCL unique id
/// (made by rank 0, read by all), barriers, an abort flag, and other tiny blobs. Two implementations:
/// <see cref="RendezvousClient"/> (our own authenticated server, hosted by rank 0's process: our launcher
/// and Slurm's srun) and <see cref="TcpStoreClient"/> (torchrun's agent store, a PyTorch TCPStore).
/// </summary>
/// <remarks>
/// Thread-safe: a watchdog thread may poll <see cref="TryGet"/> while the main thread blocks in
/// <see cref="Get"/> or <see cref="Barrier"/> on the same instance; neither waits for the other.
/// Keys are short UTF-8 strings (at most <see cref="MaxKeyBytes"/> bytes), values small blobs (at most
/// <see cref="MaxValueBytes"/> bytes): the servers refuse anything larger, so this is no place for
/// tensors. Nothing here logs or prints a value, only keys and sizes.
/// </remarks>
public interface IRendezvousStore : IDisposable
{
    /// <summary>Longest key, in UTF-8 bytes.</summary>
    const int MaxKeyBytes = 256;

    /// <summary>Largest value, in bytes (an NCCL unique id is 128).</summary>
    const int MaxValueBytes = 4096;

    /// <summary>Where the store is, for messages: "rendezvous server 10.0.0.5:29500" or "torchrun store 10.0.0.5:29500".</summary>
    string Endpoint { get; }

    /// <summary>Stores <paramref name="value"/> under <paramref name="key"/>, replacing any earlier value, and wakes every rank waiting for it.</summary>
    void Set(string key, ReadOnlySpan<byte> value);

    /// <summary>
    /// The value under <paramref name="key"/>, waiting until some rank sets it. Throws
    /// <see cref="RendezvousTimeoutException"/> naming the key, the server and the time waited when
    /// <paramref name="timeout"/> passes first.
    /// </summary>
    byte[] Get(string key, TimeSpan timeout);

    /// <summary>The value under <paramref name="key"/> if it is set now; never waits for it.</summary>
    bool TryGet(string key, out byte[] value);

    /// <summary>Adds <paramref name="delta"/> to the counter under <paramref name="key"/> (created at 0) and returns the new value.</summary>
    long Add(string key, long delta);

    /// <summary>
    /// Returns once <paramref name="parties"/> ranks have entered the barrier <paramref name="name"/>;
    /// each name is used once per job (a second use is an error, not a silent pass).
    /// </summary>
    void Barrier(string name, int parties, TimeSpan timeout);
}

/// <summary>A rendezvous operation failed: the server went away, answered nonsense, or a rank raised the abort flag.</summary>
public class RendezvousException : Exception
{
    public RendezvousException(string message) : base(message) { }
    public RendezvousException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>A wait (for a key or a barrier) passed its deadline; the message names the key, the server and the time waited.</summary>
public sealed class RendezvousTimeoutException : RendezvousException
{
    public RendezvousTimeoutException(string message) : base(message) { }
}

/// <summary>Keys the runtime shares between ranks, and the operations every store builds from Set/Get/Add.</summary>
public static class RendezvousKeys
{
    /// <summary>Where rank 0 publishes the world communicator's NCCL unique id.</summary>
    public const string NcclUniqueId = "nccl/unique-id";

    /// <summary>Set by any rank that fails; its value is a UTF-8 reason. Others poll it with <see cref="TryGetAbort"/>.</summary>
    public const string Abort = "abort";

    /// <summary>Longest abort reason kept, in UTF-8 bytes (longer reasons are cut at a character boundary, marked "…").</summary>
    public const int MaxAbortReasonBytes = 1024;

    /// <summary>
    /// Raises the job's abort flag with a reason that names the rank, so that every other rank stops promptly
    /// instead of waiting for a collective's deadline. The reason is a message for people: no secrets in it.
    /// </summary>
    public static void RaiseAbort(this IRendezvousStore store, int rank, string reason)
    {
        string text = $"rank {rank}: {reason}";
        byte[] bytes = Encoding.UTF8.GetBytes(text);
        if (bytes.Length > MaxAbortReasonBytes) bytes = Truncate(text, MaxAbortReasonBytes);
        store.Set(Abort, bytes);
    }

    /// <summary>True, with the reason, once some rank has raised the abort flag. Cheap: one round trip.</summary>
    public static bool TryGetAbort(this IRendezvousStore store, out string reason)
    {
        if (store.TryGet(Abort, out byte[] bytes))
        {
            reason = Encoding.UTF8.GetString(bytes);
            return true;
        }
        reason = "";
        return false;
    }

    /// <summary>
    /// The barrier both stores share, built from Add and Get as torch's store-based barrier is: each rank
    /// increments "barrier/NAME/arrived"; the last one sets "barrier/NAME/open", which the others wait for.
    /// A name entered more than <paramref name="parties"/> times is an error, since the second use of a
    /// name would otherwise pass at once without waiting for anyone.
    /// </summary>
    internal static void RunBarrier(IRendezvousStore store, string name, int parties, TimeSpan timeout)
    {
        if (parties < 1) throw new ArgumentOutOfRangeException(nameof(parties), parties, "a barrier needs at least one party");
        string arrivedKey = $"barrier/{name}/arrived", openKey = $"barrier/{name}/open";
        long arrived = store.Add(arrivedKey, 1);
        if (arrived > parties)
            throw new RendezvousException(
                $"barrier '{name}' at the {store.Endpoint} was entered {arrived} times for {parties} parties: " +
                "each barrier name must be used once per job (add a step number or phase to the name).");
        if (arrived == parties) store.Set(openKey, [1]);
        try
        {
            store.Get(openKey, timeout);
        }
        catch (RendezvousTimeoutException)
        {
            long now = store.Add(arrivedKey, 0);
            throw new RendezvousTimeoutException(
                $"barrier '{name}' at the {store.Endpoint} timed out after {Seconds(timeout)}: {now} of {parties} ranks arrived " +
                "(a rank that has not arrived failed, is still starting, or waits elsewhere; its log says which).");
        }
    }

    /// <summary>A duration for messages: "250 ms", "30 s", "2.5 s".</summary>
    internal static string Seconds(TimeSpan t) =>
        t.TotalSeconds < 1 ? $"{t.TotalMilliseconds:0} ms" : $"{t.TotalSeconds:0.#} s";

    /// <summary>Checks a key against <see cref="IRendezvousStore.MaxKeyBytes"/> and returns its UTF-8 bytes.</summary>
    internal static byte[] KeyBytes(string key)
    {
        ArgumentException.ThrowIfNullOrEmpty(key);
        byte[] bytes = Encoding.UTF8.GetBytes(key);
        if (bytes.Length > IRendezvousStore.MaxKeyBytes)
            throw new ArgumentException($"rendezvous key '{key[..Math.Min(key.Length, 40)]}…' is {bytes.Length} bytes; the limit is {IRendezvousStore.MaxKeyBytes}.", nameof(key));
        return bytes;
    }

    /// <summary>Checks a value against <see cref="IRendezvousStore.MaxValueBytes"/>.</summary>
    internal static void CheckValue(string key, int length)
    {
        if (length > IRendezvousStore.MaxValueBytes)
            throw new ArgumentException($"the value for rendezvous key '{key}' is {length} bytes; the limit is {IRendezvousStore.MaxValueBytes} (the store is for small blobs).", "value");
    }

    private static byte[] Truncate(string text, int maxBytes)
    {
        var encoder = Encoding.UTF8.GetEncoder();
        byte[] buffer = new byte[maxBytes];
        byte[] ellipsis = Encoding.UTF8.GetBytes("…");
        encoder.Convert(text.AsSpan(), buffer.AsSpan(0, maxBytes - ellipsis.Length), flush: true, out _, out int used, out _);
        ellipsis.CopyTo(buffer, used);
        return buffer[..(used + ellipsis.Length)];
    }
}
