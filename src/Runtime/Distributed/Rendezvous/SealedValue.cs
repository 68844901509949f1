using System.Security.Cryptography;
using System.Text;

namespace Moe.Runtime.Distributed.Rendezvous;

/// <summary>
/// Values written to a store that authenticates nobody (torchrun's TCPStore), sealed with AES-256-GCM under a
/// key derived from the job secret: a reader of the store learns only their length, and a value written or
/// altered by anyone without the secret fails to open. The wire key is the associated data, so a sealed value
/// cannot be moved to another key or restart attempt either.
/// </summary>
/// <remarks>Layout: "MOES" | version 1 | nonce[12] (random) | ciphertext | tag[16].</remarks>
internal static class SealedValue
{
    private static ReadOnlySpan<byte> Magic => "MOES"u8;
    private const byte Version = 1;
    private const int NonceBytes = 12, TagBytes = 16;
    public const int Overhead = 4 + 1 + NonceBytes + TagBytes;

    public static byte[] Seal(byte[] key, string wireKey, ReadOnlySpan<byte> plaintext)
    {
        byte[] sealedValue = new byte[Overhead + plaintext.Length];
        Magic.CopyTo(sealedValue);
        sealedValue[4] = Version;
        var nonce = sealedValue.AsSpan(5, NonceBytes);
        RandomNumberGenerator.Fill(nonce);
        using var aes = new AesGcm(key, TagBytes);
        aes.Encrypt(nonce, plaintext, sealedValue.AsSpan(5 + NonceBytes, plaintext.Length),
            sealedValue.AsSpan(5 + NonceBytes + plaintext.Length), Encoding.UTF8.GetBytes(wireKey));
        return sealedValue;
    }

    public static bool LooksSealed(ReadOnlySpan<byte> stored) => stored.Length >= Overhead && stored[..4].SequenceEqual(Magic);

    /// <summary>The plaintext, or null when the value fails authentication (another secret, or altered).</summary>
    public static byte[]? Open(byte[] key, string wireKey, ReadOnlySpan<byte> stored)
    {
        if (!LooksSealed(stored) || stored[4] != Version) return null;
        int n = stored.Length - Overhead;
        byte[] plaintext = new byte[n];
        using var aes = new AesGcm(key, TagBytes);
        try
        {
            aes.Decrypt(stored.Slice(5, NonceBytes), stored.Slice(5 + NonceBytes, n), stored.Slice(5 + NonceBytes + n, TagBytes),
                plaintext, Encoding.UTF8.GetBytes(wireKey));
            return plaintext;
        }
        catch (AuthenticationTagMismatchException)
        {
            return null;
        }
    }
}
