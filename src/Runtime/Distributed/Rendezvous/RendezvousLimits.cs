namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// The bounds that keep <see cref="RendezvousServer"/> responsive to real ranks whatever else connects.
/// The defaults suit a job; tests shorten the deadlines.
/// </summary>
public sealed record RendezvousLimits
{
    /// <summary>A new connection must finish the whole handshake (HELLO, PROOF) within this, or it is closed.</summary>
    public TimeSpan HandshakeDeadline { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// Once an authenticated rank starts a frame it must finish it within this; a reply it does not read
    /// within this also closes it. Between frames a rank may stay silent as long as it likes (it may be
    /// training for days).
    /// </summary>
    public TimeSpan FrameDeadline { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Connections still in their handshake at once; beyond this new ones are closed at accept (real ranks retry).</summary>
    public int MaxPendingConnections { get; init; } = 4096;

    /// <summary>Blocking GETs one connection may have outstanding together.</summary>
    public int MaxWaitsPerConnection { get; init; } = 64;

    /// <summary>Replies queued for a connection that is not reading them; beyond this it is closed.</summary>
    public int MaxQueuedReplies { get; init; } = 256;

    /// <summary>Bytes the store may hold (keys, values and a fixed overhead per entry); a SET beyond it is answered with an error.</summary>
    public long MaxStoreBytes { get; init; } = 64L << 20;
}
