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

    private SafetensorsFile(string path, MemoryMappedFile map, MemoryMappedViewAccessor view, long dataStart,
        Dictionary<string, SafetensorsEntry> entries)
    {
        Path = path;
        _map = map;
        _view = view;
        _dataStart = dataStart;
        Entries = entries;
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
                if (p.Name == "__metadata__") continue;   // free-form strings (transformers writes {"format": "pt"})
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
        return new SafetensorsFile(path, map, view, dataStart, entries);
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
    public static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        var list = tensors.ToList();
        var header = new StringBuilder("{\"__metadata__\":{\"format\":\"pt\"}");
        long offset = 0;
        foreach (var (name, t) in list)
        {
            long bytes = t.NumberOfElements * t.ElementSize;
            header.Append(',').Append(JsonSerializer.Serialize(name)).Append(":{\"dtype\":\"").Append(DtypeName(t.dtype))
                  .Append("\",\"shape\":[").Append(string.Join(",", t.shape)).Append("],\"data_offsets\":[")
                  .Append(offset).Append(',').Append(offset + bytes).Append("]}");
            offset += bytes;
        }
        header.Append('}');
        while ((header.Length + 8) % 8 != 0) header.Append(' ');
        byte[] headerBytes = Encoding.UTF8.GetBytes(header.ToString());
        string dir = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!;
        Directory.CreateDirectory(dir);
        string temp = System.IO.Path.Combine(dir, "." + System.IO.Path.GetFileName(path) + ".tmp-" + Environment.ProcessId);
        try
        {
            using (var fs = new FileStream(temp, FileMode.Create, FileAccess.Write))
            {
                fs.Write(BitConverter.GetBytes((ulong)headerBytes.Length));
                fs.Write(headerBytes);
                foreach (var (_, t) in list)
                {
                    using var cpu = t.detach().cpu().contiguous();
                    fs.Write(cpu.bytes);
                }
            }
            File.Move(temp, path, overwrite: true);
        }
        catch
        {
            File.Delete(temp);
            throw;
        }
    }
}
