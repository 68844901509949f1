using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using Moe.Runtime.Commands;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Checkpoints;

/// <summary>One tensor's entry in a safetensors header.</summary>
public sealed record SafetensorsEntry(string Name, string Dtype, long[] Shape, long Begin, long End)
{
    /// <summary>Element count.</summary>
    public long Elements => Shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>A tensor to write: declared up front (the header comes first), produced only when its bytes are due.</summary>
/// <param name="Name">Its name in the file.</param>
/// <param name="Dtype">Its dtype in the file.</param>
/// <param name="Shape">Its shape in the file.</param>
/// <param name="Produce">Makes the tensor (any device, any layout); what it creates is disposed once written.</param>
public sealed record PendingTensor(string Name, ScalarType Dtype, long[] Shape, Func<Tensor> Produce);

/// <summary>
/// A safetensors file read lazily: the header is parsed on open and the file is memory-mapped;
/// <see cref="Map"/> wraps a tensor's bytes in place (zero-copy, the page cache is the only copy) and
/// <see cref="Read"/> copies one tensor out; nothing ever reads the whole file.
/// Every inconsistency (truncated file, offsets past the end, a shape that does not match its byte
/// count, an unknown dtype) is a <see cref="UserError"/> that names the file and the tensor.
/// Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
/// then the data; offsets are relative to the end of the header.
/// </summary>
public sealed class SafetensorsFile : IDisposable
{
    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private readonly long _dataStart;

    public string Path { get; }

    public IReadOnlyDictionary<string, SafetensorsEntry> Entries { get; }

    /// <summary>The header's <c>__metadata__</c>: free-form strings (transformers writes {"format": "pt"}; Moe checkpoints add their block geometry).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    private SafetensorsFile(string path, MemoryMappedFile map, MemoryMappedViewAccessor view, long dataStart,
        Dictionary<string, SafetensorsEntry> entries, Dictionary<string, string> metadata)
    {
        Path = path;
        _map = map;
        _view = view;
        _dataStart = dataStart;
        Entries = entries;
        Metadata = metadata;
    }

    public static SafetensorsFile Open(string path)
    {
        if (!File.Exists(path)) throw new UserError($"{path}: no such safetensors file.");
        long length = new FileInfo(path).Length;
        if (length < 8) throw new UserError($"{path}: truncated safetensors file ({length} bytes; the 8-byte header length is missing).");
        ulong headerLength;
        using (var fs = File.OpenRead(path))
        {
            Span<byte> n = stackalloc byte[8];
            fs.ReadExactly(n);
            headerLength = BitConverter.ToUInt64(n);
        }
        if (headerLength > (ulong)(length - 8) || headerLength > 100_000_000)
            throw new UserError($"{path}: the header claims {headerLength} bytes but the file has {length - 8} after the length field; the file is truncated or not safetensors.");
        var headerBytes = new byte[headerLength];
        using (var fs = File.OpenRead(path))
        {
            fs.Position = 8;
            fs.ReadExactly(headerBytes);
        }
        long dataStart = 8 + (long)headerLength;
        long dataLength = length - dataStart;
        var entries = new Dictionary<string, SafetensorsEntry>(StringComparer.Ordinal);
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(headerBytes);
        }
        catch (JsonException e)
        {
            throw new UserError($"{path}: the safetensors header is not valid JSON ({e.Message}).");
        }
        using (doc)
        {
            foreach (var p in doc.RootElement.EnumerateObject())
            {
                if (p.Name == "__metadata__")
                {
                    if (p.Value.ValueKind == JsonValueKind.Object)
                        foreach (var m in p.Value.EnumerateObject().Where(m => m.Value.ValueKind == JsonValueKind.String)) metadata[m.Name] = m.Value.GetString()!;
                    continue;
                }
                try
                {
                    string dtype = p.Value.GetProperty("dtype").GetString()!;
                    long[] shape = p.Value.GetProperty("shape").EnumerateArray().Select(e => e.GetInt64()).ToArray();
                    var offsets = p.Value.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()).ToArray();
                    var entry = new SafetensorsEntry(p.Name, dtype, shape, offsets[0], offsets[1]);
                    long expected = entry.Elements * ElementSize(dtype, path, p.Name);
                    if (entry.End - entry.Begin != expected)
                        throw new UserError($"{path}: tensor '{p.Name}' has shape [{string.Join(", ", shape)}] ({dtype}, {expected} bytes) but its data offsets span {entry.End - entry.Begin} bytes.");
                    if (entry.Begin < 0 || entry.End > dataLength)
                        throw new UserError($"{path}: tensor '{p.Name}' ends at byte {entry.End} of the data section, which has only {dataLength} bytes; the file is truncated.");
                    entries[p.Name] = entry;
                }
                catch (KeyNotFoundException)
                {
                    throw new UserError($"{path}: tensor '{p.Name}' lacks dtype, shape or data_offsets in the header.");
                }
            }
        }
        var map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        var view = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
        return new SafetensorsFile(path, map, view, dataStart, entries, metadata);
    }

    /// <summary>The entry named <paramref name="name"/>; a UserError naming the file when absent.</summary>
    public SafetensorsEntry Entry(string name) =>
        Entries.TryGetValue(name, out var e) ? e : throw new UserError($"{Path}: has no tensor '{name}'.");

    /// <summary>Copies one tensor out of the mapping into a new CPU tensor of its stored dtype.</summary>
    public unsafe Tensor Read(string name)
    {
        var e = Entry(name);
        var t = torch.empty(e.Shape, dtype: ScalarTypeOf(e.Dtype, Path, name));
        long bytes = e.End - e.Begin;
        if (bytes == 0) return t;
        byte* basePtr = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            byte* src = basePtr + _view.PointerOffset + _dataStart + e.Begin;
            var dst = t.bytes;
            long done = 0;
            while (done < bytes)
            {
                int chunk = (int)Math.Min(int.MaxValue / 2, bytes - done);
                new ReadOnlySpan<byte>(src + done, chunk).CopyTo(dst.Slice((int)done, chunk));
                done += chunk;
            }
        }
        finally
        {
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
        }
        return t;
    }

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    private delegate void Deleter(IntPtr context);

    // The mapping owns the memory; libtorch must still be handed a deleter (a C++ reference that may not be
    // null). Static, so the delegate outlives every tensor.
    private static readonly Deleter KeepMapping = _ => { };

    // TorchSharp's internal C ABI (LibTorchSharp THSTensorFactories.cpp): from_blob over existing memory.
    // Not public API: re-check on every TorchSharp upgrade (SafetensorsMapTests exercises it).
    [DllImport("LibTorchSharp")]
    private static extern unsafe IntPtr THSTensor_new(IntPtr data, Deleter deleter, long* sizes, int ndims, sbyte type, sbyte dtype,
        int deviceType, int deviceIndex, [MarshalAs(UnmanagedType.U1)] bool requiresGrad);

    /// <summary>
    /// A CPU tensor that aliases the tensor's bytes in the memory-mapped file: no copy, pages are read from
    /// the page cache on first touch. The mapping is read-only, so the tensor is a copy <b>source</b> only
    /// (<c>param.copy_(file.Map(key))</c>, <c>.to(cuda)</c>, slicing for a rank's shard) — writing to it
    /// crashes — and it must be disposed before this file is.
    /// </summary>
    public unsafe Tensor Map(string name)
    {
        var e = Entry(name);
        var type = ScalarTypeOf(e.Dtype, Path, name);
        if (e.End == e.Begin) return torch.empty(e.Shape, dtype: type);
        lock (_pinLock)
        {
            if (_pinned is null)
            {
                byte* basePtr = null;
                _view.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
                _pinned = basePtr + _view.PointerOffset;
            }
        }
        byte* data = _pinned + _dataStart + e.Begin;
        IntPtr handle;
        fixed (long* sizes = e.Shape)
            handle = THSTensor_new((IntPtr)data, KeepMapping, sizes, e.Shape.Length, (sbyte)type, (sbyte)type, (int)DeviceType.CPU, 0, false);
        if (handle == IntPtr.Zero) throw new InvalidOperationException($"{Path}: libtorch could not wrap tensor '{name}' ({e.Dtype} [{string.Join(", ", e.Shape)}]).");
        return Tensor.UnsafeCreateTensor(handle);
    }

    private readonly object _pinLock = new();
    private unsafe byte* _pinned;

    public unsafe void Dispose()
    {
        if (_pinned is not null)
        {
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
            _pinned = null;
        }
        _view.Dispose();
        _map.Dispose();
    }

    internal static ScalarType ScalarTypeOf(string dtype, string path, string name) => dtype switch
    {
        "F32" => ScalarType.Float32,
        "F16" => ScalarType.Float16,
        "BF16" => ScalarType.BFloat16,
        "F64" => ScalarType.Float64,
        "I64" => ScalarType.Int64,
        "I32" => ScalarType.Int32,
        "I16" => ScalarType.Int16,
        "I8" => ScalarType.Int8,
        "U8" => ScalarType.Byte,
        "BOOL" => ScalarType.Bool,
        _ => throw new UserError($"{path}: tensor '{name}' has dtype {dtype}, which Moe does not read."),
    };

    internal static string DtypeName(ScalarType t) => t switch
    {
        ScalarType.Float32 => "F32",
        ScalarType.Float16 => "F16",
        ScalarType.BFloat16 => "BF16",
        ScalarType.Float64 => "F64",
        ScalarType.Int64 => "I64",
        ScalarType.Int32 => "I32",
        ScalarType.Int16 => "I16",
        ScalarType.Int8 => "I8",
        ScalarType.Byte => "U8",
        ScalarType.Bool => "BOOL",
        _ => throw new ArgumentException($"safetensors has no dtype for {t}"),
    };

    /// <summary>Bytes per element of a dtype safetensors stores.</summary>
    internal static long ElementBytes(ScalarType t) => ElementSize(DtypeName(t), "", "");

    private static long ElementSize(string dtype, string path, string name) => dtype switch
    {
        "F64" or "I64" => 8,
        "F32" or "I32" => 4,
        "F16" or "BF16" or "I16" => 2,
        "I8" or "U8" or "BOOL" => 1,
        _ => throw new UserError($"{path}: tensor '{name}' has dtype {dtype}, which Moe does not read."),
    };

    /// <summary>
    /// Writes tensors (any device; copied to CPU one at a time) as a safetensors file with
    /// <c>__metadata__ {"format":"pt"}</c> and an 8-byte-aligned header, into a temporary file that is
    /// renamed over <paramref name="path"/> only when complete.
    /// </summary>
    public static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors) =>
        Write(path, tensors.Select(kv => new PendingTensor(kv.Key, kv.Value.dtype, kv.Value.shape, () => kv.Value)).ToList());

    /// <summary>
    /// Writes <paramref name="tensors"/> as a safetensors file — each produced, copied to the CPU in pieces of at most
    /// 64 MiB and written before the next is produced, so host memory stays small — into a temporary file beside
    /// <paramref name="path"/> that is flushed to disk (fsync) and renamed over it only when complete; on any error the
    /// temporary file is removed and the error rethrown. <paramref name="metadata"/> joins <c>"format": "pt"</c> in
    /// <c>__metadata__</c>. <paramref name="create"/> opens the temporary file (a seam for tests that fail writes).
    /// </summary>
    public static void Write(string path, IReadOnlyList<PendingTensor> tensors, IReadOnlyDictionary<string, string>? metadata = null,
        Func<string, Stream>? create = null)
    {
        var header = new StringBuilder("{\"__metadata__\":{\"format\":\"pt\"");
        foreach (var (key, value) in metadata ?? new Dictionary<string, string>())
            if (key != "format") header.Append(',').Append(JsonSerializer.Serialize(key)).Append(':').Append(JsonSerializer.Serialize(value));
        header.Append('}');
        long offset = 0;
        foreach (var t in tensors)
        {
            long bytes = t.Shape.Aggregate(1L, (a, b) => a * b) * ElementSize(DtypeName(t.Dtype), path, t.Name);
            header.Append(',').Append(JsonSerializer.Serialize(t.Name)).Append(":{\"dtype\":\"").Append(DtypeName(t.Dtype))
                  .Append("\",\"shape\":[").Append(string.Join(",", t.Shape)).Append("],\"data_offsets\":[")
                  .Append(offset).Append(',').Append(offset + bytes).Append("]}");
            offset += bytes;
        }
        header.Append('}');
        while ((Encoding.UTF8.GetByteCount(header.ToString()) + 8) % 8 != 0) header.Append(' ');
        byte[] headerBytes = Encoding.UTF8.GetBytes(header.ToString());
        string dir = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!;
        Directory.CreateDirectory(dir);
        string temp = System.IO.Path.Combine(dir, "." + System.IO.Path.GetFileName(path) + ".tmp-" + Environment.ProcessId + "-" + Environment.CurrentManagedThreadId);
        try
        {
            using (var fs = (create ?? CreateFile)(temp))
            {
                fs.Write(BitConverter.GetBytes((ulong)headerBytes.Length));
                fs.Write(headerBytes);
                foreach (var t in tensors) WriteData(fs, t, path);
                fs.Flush();
                if (fs is FileStream file) file.Flush(flushToDisk: true);
            }
            File.Move(temp, path, overwrite: true);
        }
        catch
        {
            File.Delete(temp);
            throw;
        }
    }

    private static Stream CreateFile(string path) => new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);

    private static void WriteData(Stream stream, PendingTensor pending, string path)
    {
        using var scope = torch.NewDisposeScope();
        var t = pending.Produce();
        if (t.dtype != pending.Dtype || !t.shape.SequenceEqual(pending.Shape))
            throw new InvalidOperationException($"{path}: tensor '{pending.Name}' was declared {pending.Dtype} [{string.Join(", ", pending.Shape)}] but produced {t.dtype} [{string.Join(", ", t.shape)}].");
        using var flat = t.detach().reshape(-1);
        long n = flat.NumberOfElements, chunk = Math.Max(1, (64L << 20) / flat.ElementSize);
        for (long i = 0; i < n; i += chunk)
        {
            using var part = flat.narrow(0, i, Math.Min(chunk, n - i)).cpu().contiguous();
            stream.Write(part.bytes);
        }
    }
}
