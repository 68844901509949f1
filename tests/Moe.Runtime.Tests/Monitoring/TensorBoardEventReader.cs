using System.Buffers.Binary;
using System.Text;

namespace Moe.Runtime.Tests.Monitoring;

/// <summary>
/// A TensorBoard event-file reader written for the tests from the formats' specifications, sharing no code with
/// the writer: TFRecord framing (tensorflow/core/lib/io/record_writer.cc: uint64 length, masked CRC-32C of the
/// length, data, masked CRC-32C of the data; crc32c.h's mask) and the protobuf wire format
/// (protobuf.dev/programming-guides/encoding: varint keys, wire types 0, 1, 2, 5) decoding
/// tensorflow/core/util/event.proto's Event (wall_time 1, step 2, file_version 3, summary 5) and summary.proto's
/// Summary (value 1) and Summary.Value (tag 1, simple_value 2). Every CRC is checked; any mismatch throws.
/// </summary>
internal static class TensorBoardEventReader
{
    public sealed record Event(double WallTime, long? Step, string? FileVersion, IReadOnlyDictionary<string, float> Scalars);

    /// <summary>CRC-32C, bit by bit with the reflected Castagnoli polynomial 0x82F63B78 (RFC 3720 B.4).</summary>
    public static uint Crc32C(ReadOnlySpan<byte> data)
    {
        uint crc = 0xFFFFFFFF;
        foreach (byte b in data)
        {
            crc ^= b;
            for (int i = 0; i < 8; i++) crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F63B78 : crc >> 1;
        }
        return crc ^ 0xFFFFFFFF;
    }

    private static uint Masked(ReadOnlySpan<byte> data)
    {
        uint crc = Crc32C(data);
        return unchecked(((crc >> 15) | (crc << 17)) + 0xa282ead8);
    }

    public static List<Event> Read(byte[] file)
    {
        var events = new List<Event>();
        int pos = 0;
        while (pos < file.Length)
        {
            if (file.Length - pos < 12) throw new InvalidDataException($"truncated record header at byte {pos}");
            var lengthBytes = file.AsSpan(pos, 8);
            ulong length = BinaryPrimitives.ReadUInt64LittleEndian(lengthBytes);
            uint lengthCrc = BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(pos + 8, 4));
            if (lengthCrc != Masked(lengthBytes)) throw new InvalidDataException($"length CRC mismatch at byte {pos}");
            pos += 12;
            if ((ulong)(file.Length - pos) < length + 4) throw new InvalidDataException($"truncated record at byte {pos}");
            var data = file.AsSpan(pos, (int)length);
            uint dataCrc = BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(pos + (int)length, 4));
            if (dataCrc != Masked(data)) throw new InvalidDataException($"data CRC mismatch at byte {pos}");
            events.Add(ParseEvent(data.ToArray()));
            pos += (int)length + 4;
        }
        return events;
    }

    private static Event ParseEvent(byte[] data)
    {
        double wall = double.NaN;
        long? step = null;
        string? version = null;
        var scalars = new Dictionary<string, float>();
        foreach (var (field, wire, value, bytes) in Fields(data))
        {
            switch (field, wire)
            {
                case (1, 1): wall = BitConverter.Int64BitsToDouble((long)value); break;
                case (2, 0): step = (long)value; break;
                case (3, 2): version = Encoding.UTF8.GetString(bytes!); break;
                case (5, 2):
                    foreach (var (vf, vw, _, vbytes) in Fields(bytes!))
                    {
                        if (vf != 1 || vw != 2) throw new InvalidDataException($"Summary field {vf}/{vw} unexpected");
                        string? tag = null;
                        float? simple = null;
                        foreach (var (f, w, v, b) in Fields(vbytes!))
                        {
                            if (f == 1 && w == 2) tag = Encoding.UTF8.GetString(b!);
                            else if (f == 2 && w == 5) simple = BitConverter.Int32BitsToSingle((int)v);
                        }
                        if (tag is null || simple is null) throw new InvalidDataException("Summary.Value without tag or simple_value");
                        scalars.Add(tag, simple.Value);
                    }
                    break;
                default: throw new InvalidDataException($"Event field {field} with wire type {wire} is not expected");
            }
        }
        return new Event(wall, step, version, scalars);
    }

    /// <summary>(field number, wire type, fixed or varint value, bytes of a length-delimited field).</summary>
    private static IEnumerable<(int Field, int Wire, ulong Value, byte[]? Bytes)> Fields(byte[] message)
    {
        int pos = 0;
        ulong Varint()
        {
            ulong result = 0;
            for (int shift = 0; ; shift += 7)
            {
                if (pos >= message.Length || shift > 63) throw new InvalidDataException("bad varint");
                byte b = message[pos++];
                result |= (ulong)(b & 0x7F) << shift;
                if ((b & 0x80) == 0) return result;
            }
        }
        while (pos < message.Length)
        {
            ulong key = Varint();
            int field = (int)(key >> 3), wire = (int)(key & 7);
            switch (wire)
            {
                case 0: yield return (field, wire, Varint(), null); break;
                case 1: yield return (field, wire, BinaryPrimitives.ReadUInt64LittleEndian(message.AsSpan(pos, 8)), null); pos += 8; break;
                case 5: yield return (field, wire, BinaryPrimitives.ReadUInt32LittleEndian(message.AsSpan(pos, 4)), null); pos += 4; break;
                case 2:
                    int n = checked((int)Varint());
                    yield return (field, wire, 0, message.AsSpan(pos, n).ToArray());
                    pos += n;
                    break;
                default: throw new InvalidDataException($"wire type {wire}");
            }
        }
    }
}
