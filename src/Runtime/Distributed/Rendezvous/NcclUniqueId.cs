using System.Diagnostics;

namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// The 128 bytes <c>ncclGetUniqueId</c> makes on rank 0 and every rank passes to <c>ncclCommInitRank</c>.
/// Whoever holds them can connect to NCCL's bootstrap root and disturb the communicator's creation, so
/// they are handled like a credential: no property exposes them (a serializer or a debugger display finds
/// nothing), <see cref="ToString"/> is a placeholder, and they travel only through the rendezvous store
/// (<see cref="PublishTo"/>, <see cref="ReadFrom"/>), never a log or the run directory.
/// </summary>
[DebuggerDisplay("<nccl unique id>")]
public sealed class NcclUniqueId
{
    /// <summary>NCCL_UNIQUE_ID_BYTES in nccl.h.</summary>
    public const int Size = 128;

    [DebuggerBrowsable(DebuggerBrowsableState.Never)]
    private readonly byte[] _bytes;

    private NcclUniqueId(byte[] bytes) => _bytes = bytes;

    /// <summary>Wraps the bytes ncclGetUniqueId wrote (copied); anything but <see cref="Size"/> bytes is a bug.</summary>
    public static NcclUniqueId FromBytes(ReadOnlySpan<byte> bytes)
    {
        if (bytes.Length != Size)
            throw new ArgumentException($"an NCCL unique id is {Size} bytes, not {bytes.Length}.", nameof(bytes));
        return new NcclUniqueId(bytes.ToArray());
    }

    /// <summary>Copies the id into <paramref name="destination"/> (the ncclUniqueId struct passed to ncclCommInitRank).</summary>
    public void CopyTo(Span<byte> destination)
    {
        if (destination.Length < Size)
            throw new ArgumentException($"an NCCL unique id needs {Size} bytes; the destination has {destination.Length}.", nameof(destination));
        _bytes.CopyTo(destination);
    }

    /// <summary>Rank 0: publishes the id under <paramref name="key"/> (default <see cref="RendezvousKeys.NcclUniqueId"/>).</summary>
    public void PublishTo(IRendezvousStore store, string key = RendezvousKeys.NcclUniqueId) => store.Set(key, _bytes);

    /// <summary>
    /// Every other rank: waits up to <paramref name="timeout"/> for rank 0's id under <paramref name="key"/>.
    /// A value of the wrong size is an error naming the key and the size, never the bytes.
    /// </summary>
    public static NcclUniqueId ReadFrom(IRendezvousStore store, TimeSpan timeout, string key = RendezvousKeys.NcclUniqueId)
    {
        byte[] value = store.Get(key, timeout);
        if (value.Length != Size)
            throw new RendezvousException(
                $"the value under '{key}' at the {store.Endpoint} is {value.Length} bytes, not an NCCL unique id ({Size} bytes): " +
                "another program uses this key or this store.");
        return new NcclUniqueId(value);
    }

    /// <summary>A placeholder: the id is never printed.</summary>
    public override string ToString() => "<nccl unique id>";
}
