using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using Moe.Runtime.Commands;

namespace Moe.Runtime.Data;

/// <summary>Token dtypes of Megatron's MMIDIDX format (indexed_dataset.py DType codes).</summary>
public enum IndexedDtype : byte
{
    UInt8 = 1, Int8 = 2, Int16 = 3, Int32 = 4, Int64 = 5, Float64 = 6, Float32 = 7, UInt16 = 8,
}

/// <summary>
/// Megatron-Core's indexed dataset (.bin + .idx, "MMIDIDX"), memory-mapped. The .idx holds: 9-byte magic
/// "MMIDIDX\0\0", u64 version 1, u8 dtype code, u64 sequence count S, u64 document count D, i32[S]
/// lengths, i64[S] byte pointers into .bin, i64[D] document indices (sequence index of each document
/// boundary, starting with 0). The .bin is the tokens back to back. All little-endian.
/// </summary>
public sealed class IndexedDataset : IDisposable
{
    public static readonly byte[] Magic = "MMIDIDX\0\0"u8.ToArray();

    private readonly MemoryMappedFile? _bin;
    private readonly MemoryMappedViewAccessor? _binView;

    public string Prefix { get; }
    public IndexedDtype Dtype { get; }
    public int[] Lengths { get; }
    public long[] Pointers { get; }
    public long[] DocumentIndices { get; }

    public int SequenceCount => Lengths.Length;

    private IndexedDataset(string prefix, IndexedDtype dtype, int[] lengths, long[] pointers, long[] docs, MemoryMappedFile? bin, MemoryMappedViewAccessor? view)
    {
        Prefix = prefix;
        Dtype = dtype;
        Lengths = lengths;
        Pointers = pointers;
        DocumentIndices = docs;
        _bin = bin;
        _binView = view;
    }

    public static int ItemSize(IndexedDtype d) => d switch
    {
        IndexedDtype.UInt8 or IndexedDtype.Int8 => 1,
        IndexedDtype.Int16 or IndexedDtype.UInt16 => 2,
        IndexedDtype.Int32 or IndexedDtype.Float32 => 4,
        _ => 8,
    };

    /// <summary>Megatron's preprocessing choice: uint16 when the vocabulary has fewer than 65500 ids, else int32.</summary>
    public static IndexedDtype DtypeForVocabulary(int vocabSize) => vocabSize < 65500 ? IndexedDtype.UInt16 : IndexedDtype.Int32;

    /// <summary>Opens prefix.idx and prefix.bin; every inconsistency is a <see cref="UserError"/> naming the file.</summary>
    public static IndexedDataset Open(string prefix)
    {
        string idx = prefix + ".idx", binPath = prefix + ".bin";
        if (!File.Exists(idx)) throw new UserError($"{idx} does not exist (a dataset prefix names prefix.idx and prefix.bin; run `moe preprocess` to make them).");
        if (!File.Exists(binPath)) throw new UserError($"{binPath} does not exist.");
        byte[] b = File.ReadAllBytes(idx);
        if (b.Length < 34 || !b.AsSpan(0, 9).SequenceEqual(Magic))
            throw new UserError($"{idx}: not a Megatron MMIDIDX index (bad magic).");
        ulong version = BitConverter.ToUInt64(b, 9);
        if (version != 1) throw new UserError($"{idx}: index version {version}; Megatron writes version 1.");
        var dtype = (IndexedDtype)b[17];
        if (!Enum.IsDefined(dtype)) throw new UserError($"{idx}: unknown dtype code {b[17]}.");
        long seqs = (long)BitConverter.ToUInt64(b, 18), docs = (long)BitConverter.ToUInt64(b, 26);
        long need = 34 + 12 * seqs + 8 * docs;
        if (seqs < 0 || docs < 1 || need > b.Length)
            throw new UserError($"{idx}: claims {seqs} sequences and {docs} document entries ({need} bytes) but has {b.Length} bytes; the file is truncated.");
        var lengths = MemoryMarshal.Cast<byte, int>(b.AsSpan(34, (int)(4 * seqs))).ToArray();
        var pointers = MemoryMarshal.Cast<byte, long>(b.AsSpan((int)(34 + 4 * seqs), (int)(8 * seqs))).ToArray();
        var docIdx = MemoryMarshal.Cast<byte, long>(b.AsSpan((int)(34 + 12 * seqs), (int)(8 * docs))).ToArray();
        long binLength = new FileInfo(binPath).Length;
        int item = ItemSize(dtype);
        for (int i = 0; i < seqs; i++)
        {
            if (lengths[i] < 0 || pointers[i] < 0 || pointers[i] + (long)lengths[i] * item > binLength)
                throw new UserError($"{binPath}: sequence {i} ({lengths[i]} tokens at byte {pointers[i]}) runs past the end of the file ({binLength} bytes); the .bin is truncated or belongs to another index.");
        }
        MemoryMappedFile? map = null;
        MemoryMappedViewAccessor? view = null;
        if (binLength > 0)
        {
            map = MemoryMappedFile.CreateFromFile(binPath, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            view = map.CreateViewAccessor(0, binLength, MemoryMappedFileAccess.Read);
        }
        return new IndexedDataset(prefix, dtype, lengths, pointers, docIdx, map, view);
    }

    /// <summary>The tokens of sequence <paramref name="i"/> (or <paramref name="count"/> of them from <paramref name="offset"/>).</summary>
    public long[] Read(int i, int offset = 0, int? count = null)
    {
        int n = count ?? Lengths[i] - offset;
        if (offset < 0 || n < 0 || offset + n > Lengths[i]) throw new ArgumentOutOfRangeException(nameof(offset));
        var result = new long[n];
        if (n == 0) return result;
        int item = ItemSize(Dtype);
        long start = Pointers[i] + (long)offset * item;
        var v = _binView!;
        for (int k = 0; k < n; k++)
        {
            long at = start + (long)k * item;
            result[k] = Dtype switch
            {
                IndexedDtype.UInt16 => v.ReadUInt16(at),
                IndexedDtype.Int32 => v.ReadInt32(at),
                IndexedDtype.Int64 => v.ReadInt64(at),
                IndexedDtype.UInt8 => v.ReadByte(at),
                IndexedDtype.Int8 => v.ReadSByte(at),
                IndexedDtype.Int16 => v.ReadInt16(at),
                _ => throw new UserError($"{Prefix}.bin: tokens of dtype {Dtype} are not token ids."),
            };
        }
        return result;
    }

    public void Dispose()
    {
        _binView?.Dispose();
        _bin?.Dispose();
    }
}

/// <summary>
/// Writes a Megatron indexed dataset byte for byte as IndexedDatasetBuilder does: sequences appended to
/// .bin, one document entry per <see cref="EndDocument"/> (an empty document still gets one). Output goes to
/// temporary files renamed over prefix.bin/.idx only by <see cref="Finish"/>, so a failed or interrupted
/// run never leaves a pair that looks whole.
/// </summary>
public sealed class IndexedDatasetBuilder : IDisposable
{
    private readonly string _prefix;
    private readonly IndexedDtype _dtype;
    private readonly FileStream _bin;
    private readonly string _binTemp;
    private readonly List<int> _lengths = new();
    private readonly List<long> _docs = new() { 0 };
    private readonly string _idxTemp;
    private bool _completed;
    private bool _finished;

    public IndexedDatasetBuilder(string prefix, IndexedDtype dtype)
    {
        _prefix = prefix;
        _dtype = dtype;
        string? dir = Path.GetDirectoryName(Path.GetFullPath(prefix));
        if (dir is not null) Directory.CreateDirectory(dir);
        // Temporary names are unique per builder, so two runs (or two tests) never share one.
        string tag = $".tmp-{Environment.ProcessId}-{Guid.NewGuid():N}";
        _binTemp = prefix + ".bin" + tag;
        _idxTemp = prefix + ".idx" + tag;
        _bin = new FileStream(_binTemp, FileMode.Create, FileAccess.Write);
    }

    public void AddSequence(ReadOnlySpan<int> tokens)
    {
        int item = IndexedDataset.ItemSize(_dtype);
        var buffer = new byte[tokens.Length * item];
        for (int i = 0; i < tokens.Length; i++)
        {
            switch (_dtype)
            {
                case IndexedDtype.UInt16:
                    if ((uint)tokens[i] > ushort.MaxValue) throw new UserError($"token id {tokens[i]} does not fit the dataset's uint16 dtype.");
                    BitConverter.TryWriteBytes(buffer.AsSpan(i * 2), (ushort)tokens[i]);
                    break;
                case IndexedDtype.Int32:
                    BitConverter.TryWriteBytes(buffer.AsSpan(i * 4), tokens[i]);
                    break;
                default:
                    throw new ArgumentException($"token datasets are written as uint16 or int32, not {_dtype}");
            }
        }
        _bin.Write(buffer);
        _lengths.Add(tokens.Length);
    }

    /// <summary>Appends a sequence of bytes (a uint8 dataset, e.g. a loss mask).</summary>
    public void AddBytes(byte[] values)
    {
        if (_dtype != IndexedDtype.UInt8) throw new ArgumentException("AddBytes writes uint8 datasets.");
        _bin.Write(values);
        _lengths.Add(values.Length);
    }

    /// <summary>Marks the end of a document (Megatron appends the number of sequences so far).</summary>
    public void EndDocument() => _docs.Add(_lengths.Count);

    public int Sequences => _lengths.Count;

    public long Tokens => _lengths.Sum(l => (long)l);

    /// <summary>Writes the index and renames both files into place (<see cref="Complete"/> then <see cref="Commit"/>).</summary>
    public void Finish()
    {
        Complete();
        Commit([this]);
    }

    /// <summary>Flushes the .bin and writes the .idx, both still under their temporary names.</summary>
    public void Complete()
    {
        if (_completed) throw new InvalidOperationException("The dataset was already completed.");
        _bin.Flush(flushToDisk: true);
        _bin.Dispose();
        using (var stream = new FileStream(_idxTemp, FileMode.Create, FileAccess.Write))
        {
            using (var w = new BinaryWriter(new BufferedStream(stream, 1 << 20), System.Text.Encoding.UTF8, leaveOpen: true))
            {
                w.Write(IndexedDataset.Magic);
                w.Write(1UL);
                w.Write((byte)_dtype);
                w.Write((ulong)_lengths.Count);
                w.Write((ulong)_docs.Count);
                foreach (int l in _lengths) w.Write(l);
                long pointer = 0;
                int item = IndexedDataset.ItemSize(_dtype);
                foreach (int l in _lengths)
                {
                    w.Write(pointer);
                    pointer += (long)l * item;
                }
                foreach (long d in _docs) w.Write(d);
            }
            stream.Flush(flushToDisk: true);
        }
        _completed = true;
    }

    /// <summary>
    /// Renames completed datasets into place together. An .idx is what makes a pair look whole, so every
    /// old .idx is removed before any new .bin arrives and every new .bin arrives before any new .idx: a run
    /// interrupted anywhere in here leaves at worst a .bin without an .idx, never a new .bin beside an old
    /// .idx, nor one key's new pair beside another key's old one (an SFT text/loss-mask pair stays aligned).
    /// </summary>
    public static void Commit(IReadOnlyList<IndexedDatasetBuilder> builders)
    {
        foreach (var b in builders)
            if (!b._completed || b._finished) throw new InvalidOperationException($"{b._prefix}: commit needs a completed, uncommitted dataset.");
        foreach (var b in builders) File.Delete(b._prefix + ".idx");
        foreach (var b in builders) File.Move(b._binTemp, b._prefix + ".bin", overwrite: true);
        foreach (var b in builders)
        {
            File.Move(b._idxTemp, b._prefix + ".idx", overwrite: true);
            b._finished = true;
        }
    }

    public void Dispose()
    {
        _bin.Dispose();
        if (!_finished)
        {
            File.Delete(_binTemp);
            File.Delete(_idxTemp);
        }
    }
}
