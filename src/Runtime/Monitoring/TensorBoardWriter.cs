using System.Buffers.Binary;
using System.Numerics;
using System.Text;
using Moe.Runtime.Training;

namespace Moe.Runtime.Monitoring;

/// <summary>
/// Writes TensorBoard event files: <c>events.out.tfevents.&lt;unix seconds&gt;.&lt;host&gt;</c>, the name TensorBoard's
/// directory watcher looks for. The file is a TFRecord stream (tensorflow/core/lib/io/record_writer.cc): each record
/// is its length (uint64, little-endian), the masked CRC-32C of those 8 bytes, the bytes, and the masked CRC-32C of
/// the bytes. Each record is an <c>Event</c> protobuf (tensorflow/core/util/event.proto): the first carries
/// <c>file_version = "brain.Event:2"</c>; the others a step, its wall time and a <c>Summary</c> of scalar
/// values (tag + simple_value). The protobuf wire format is written here by hand (varints, tags, length-delimited
/// fields): four messages with six fields need no generated code. Flushed after each step, so TensorBoard shows a
/// run while it trains and a crash loses nothing already written.
///
/// Tags follow Megatron's TensorBoard names where it has one ("lm loss", "learning-rate", "grad-norm",
/// "load_balancing_loss", "z_loss", "lm loss validation"); the rest are grouped by prefix: throughput/, memory/,
/// moe/ (drop rate overall and per layer, routed tokens per layer and expert).
/// </summary>
public sealed class TensorBoardWriter : ITrainingObserver, IDisposable
{
    private readonly FileStream _file;

    /// <summary>The event file.</summary>
    public string Path { get; }

    public TensorBoardWriter(string directory)
    {
        try
        {
            Directory.CreateDirectory(directory);
            string stem = $"events.out.tfevents.{DateTimeOffset.UtcNow.ToUnixTimeSeconds():D10}.{Environment.MachineName}";
            for (int n = 0; ; n++)
            {
                Path = System.IO.Path.Combine(directory, n == 0 ? stem : $"{stem}.{n}");
                try
                {
                    _file = new FileStream(Path, FileMode.CreateNew, FileAccess.Write);
                    break;
                }
                catch (IOException) when (File.Exists(Path) && n < 100) { }
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new UserError($"The TensorBoard directory {directory} cannot be written: {e.Message}. Choose another with --tensorboard DIR (or Health.TensorBoardDir).");
        }
        WriteRecord(Event(WallTime(), step: null, fileVersion: "brain.Event:2", summary: null));
        _file.Flush();
    }

    public StepMetrics StepEnded(StepMetrics m)
    {
        WriteRecord(Event(WallTime(), m.Step, fileVersion: null, Summary(Scalars(m))));
        _file.Flush();
        return m;
    }

    /// <summary>Every scalar of a step, by tag; unmeasured and non-finite values are left out.</summary>
    public static IEnumerable<(string Tag, double Value)> Scalars(StepMetrics m)
    {
        yield return ("loss", m.Loss);
        yield return ("lm loss", m.LmLoss);
        yield return ("load_balancing_loss", m.AuxLoss);
        yield return ("z_loss", m.ZLoss);
        yield return ("learning-rate", m.Lr);
        yield return ("grad-norm", m.GradNorm);
        yield return ("throughput/tokens_per_s", m.TokensPerSecond);
        if (m.Mfu is double mfu) yield return ("throughput/mfu", mfu);
        if (m.MemoryUsedBytes is long used) yield return ("memory/used_gib", used / (double)(1L << 30));
        if (m.MemoryHeadroom is double headroom) yield return ("memory/headroom", headroom);
        if (m.AllToAllShare is double a2a) yield return ("throughput/all_to_all_share", a2a);
        if (m.ValLoss is double val) yield return ("lm loss validation", val);
        yield return ("moe/drop_rate", m.DropRate);
        if (m.DropRatePerLayer is double[] perLayer)
            for (int l = 0; l < perLayer.Length; l++) yield return ($"moe/drop_rate/layer_{l:D2}", perLayer[l]);
        var counts = m.RoutedPerExpert ?? m.TokensPerExpert;
        for (int l = 0; l < counts.Length; l++)
            for (int e = 0; e < counts[l].Length; e++) yield return ($"moe/tokens/layer_{l:D2}/expert_{e:D2}", counts[l][e]);
    }

    private static double WallTime() => DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0;

    // Event: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5 (Summary).
    private static byte[] Event(double wallTime, long? step, string? fileVersion, byte[]? summary)
    {
        var p = new ProtoWriter();
        p.Double(1, wallTime);
        if (step is long s) p.Varint(2, (ulong)s);
        if (fileVersion is not null) p.Bytes(3, Encoding.UTF8.GetBytes(fileVersion));
        if (summary is not null) p.Bytes(5, summary);
        return p.ToArray();
    }

    // Summary: repeated Value value = 1; Value: tag = 1 (string), simple_value = 2 (float).
    private static byte[] Summary(IEnumerable<(string Tag, double Value)> scalars)
    {
        var summary = new ProtoWriter();
        foreach (var (tag, value) in scalars)
        {
            if (!double.IsFinite(value)) continue;
            var v = new ProtoWriter();
            v.Bytes(1, Encoding.UTF8.GetBytes(tag));
            v.Float(2, (float)value);
            summary.Bytes(1, v.ToArray());
        }
        return summary.ToArray();
    }

    private void WriteRecord(byte[] data)
    {
        Span<byte> header = stackalloc byte[12];
        BinaryPrimitives.WriteUInt64LittleEndian(header, (ulong)data.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(header[8..], MaskedCrc32C(header[..8]));
        Span<byte> footer = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(footer, MaskedCrc32C(data));
        _file.Write(header);
        _file.Write(data);
        _file.Write(footer);
    }

    /// <summary>TFRecord's mask: rotate the CRC-32C right by 15 bits and add 0xa282ead8 (crc32c.h, "Mask").</summary>
    public static uint MaskedCrc32C(ReadOnlySpan<byte> data)
    {
        uint crc = Crc32C(data);
        return unchecked(((crc >> 15) | (crc << 17)) + 0xa282ead8u);
    }

    /// <summary>CRC-32C (Castagnoli), initial value and final xor 0xFFFFFFFF, through the CPU's crc32 instruction where it has one.</summary>
    public static uint Crc32C(ReadOnlySpan<byte> data)
    {
        uint crc = 0xFFFFFFFFu;
        foreach (byte b in data) crc = BitOperations.Crc32C(crc, b);
        return ~crc;
    }

    public void Dispose() => _file.Dispose();

    /// <summary>The protobuf wire format's three field kinds we need: varint (0), 64-bit (1), length-delimited (2), 32-bit (5).</summary>
    private sealed class ProtoWriter
    {
        private readonly MemoryStream _bytes = new();

        public void Varint(int field, ulong value)
        {
            Key(field, 0);
            Raw(value);
        }

        public void Double(int field, double value)
        {
            Key(field, 1);
            Span<byte> b = stackalloc byte[8];
            BinaryPrimitives.WriteDoubleLittleEndian(b, value);
            _bytes.Write(b);
        }

        public void Float(int field, float value)
        {
            Key(field, 5);
            Span<byte> b = stackalloc byte[4];
            BinaryPrimitives.WriteSingleLittleEndian(b, value);
            _bytes.Write(b);
        }

        public void Bytes(int field, byte[] value)
        {
            Key(field, 2);
            Raw((ulong)value.Length);
            _bytes.Write(value);
        }

        public byte[] ToArray() => _bytes.ToArray();

        private void Key(int field, int wireType) => Raw((ulong)((field << 3) | wireType));

        private void Raw(ulong value)
        {
            while (value >= 0x80)
            {
                _bytes.WriteByte((byte)(value | 0x80));
                value >>= 7;
            }
            _bytes.WriteByte((byte)value);
        }
    }
}
