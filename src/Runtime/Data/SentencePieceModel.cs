using System.Text;

namespace Moe.Runtime.Data;

/// <summary>Piece types of sentencepiece's <c>ModelProto.SentencePiece.Type</c>.</summary>
public enum PieceType
{
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// <summary>
/// The parts of a sentencepiece <c>tokenizer.model</c> (a <c>ModelProto</c> protobuf) that encoding needs,
/// read straight from the protobuf wire format (field numbers from sentencepiece_model.proto):
/// pieces (1: piece 1, score 2, type 3), trainer_spec (2: model_type 3, vocab_size 4,
/// treat_whitespace_as_suffix 24, split_digits 25, byte_fallback 35, unk/bos/eos/pad ids 40-43) and
/// normalizer_spec (3: name 1, precompiled_charsmap 2, add_dummy_prefix 3, remove_extra_whitespaces 4,
/// escape_whitespaces 5). Unset fields take the proto2 defaults declared there.
/// </summary>
public sealed class SentencePieceModel
{
    public required IReadOnlyList<(string Piece, float Score, PieceType Type)> Pieces { get; init; }
    /// <summary>1 unigram, 2 BPE, 3 word, 4 char.</summary>
    public int ModelType { get; init; } = 1;
    public bool ByteFallback { get; init; }
    public bool SplitDigits { get; init; }
    public bool TreatWhitespaceAsSuffix { get; init; }
    public int UnkId { get; init; }
    public int BosId { get; init; } = 1;
    public int EosId { get; init; } = 2;
    public int PadId { get; init; } = -1;
    public string NormalizerName { get; init; } = "";
    public int PrecompiledCharsmapLength { get; init; }
    public bool AddDummyPrefix { get; init; } = true;
    public bool RemoveExtraWhitespaces { get; init; } = true;
    public bool EscapeWhitespaces { get; init; } = true;

    public static SentencePieceModel Parse(ReadOnlySpan<byte> data)
    {
        var pieces = new List<(string, float, PieceType)>();
        int modelType = 1, unk = 0, bos = 1, eos = 2, pad = -1, charsmap = 0;
        bool byteFallback = false, splitDigits = false, suffix = false, dummy = true, removeWs = true, escapeWs = true;
        string normName = "";
        var r = new WireReader(data);
        while (r.More)
        {
            var (field, wire) = r.Tag();
            if (field == 1 && wire == 2)
            {
                var p = new WireReader(r.Bytes());
                string piece = ""; float score = 0; var type = PieceType.Normal;
                while (p.More)
                {
                    var (f, w) = p.Tag();
                    if (f == 1 && w == 2) piece = Encoding.UTF8.GetString(p.Bytes());
                    else if (f == 2 && w == 5) score = p.Float();
                    else if (f == 3 && w == 0) type = (PieceType)(int)p.Varint();
                    else p.Skip(w);
                }
                pieces.Add((piece, score, type));
            }
            else if (field == 2 && wire == 2)
            {
                var t = new WireReader(r.Bytes());
                while (t.More)
                {
                    var (f, w) = t.Tag();
                    if (w != 0) { t.Skip(w); continue; }
                    long v = (long)t.Varint();
                    switch (f)
                    {
                        case 3: modelType = (int)v; break;
                        case 24: suffix = v != 0; break;
                        case 25: splitDigits = v != 0; break;
                        case 35: byteFallback = v != 0; break;
                        case 40: unk = (int)v; break;
                        case 41: bos = (int)v; break;
                        case 42: eos = (int)v; break;
                        case 43: pad = (int)v; break;
                    }
                }
            }
            else if (field == 3 && wire == 2)
            {
                var n = new WireReader(r.Bytes());
                while (n.More)
                {
                    var (f, w) = n.Tag();
                    if (f == 1 && w == 2) normName = Encoding.UTF8.GetString(n.Bytes());
                    else if (f == 2 && w == 2) charsmap = n.Bytes().Length;
                    else if (f == 3 && w == 0) dummy = n.Varint() != 0;
                    else if (f == 4 && w == 0) removeWs = n.Varint() != 0;
                    else if (f == 5 && w == 0) escapeWs = n.Varint() != 0;
                    else n.Skip(w);
                }
            }
            else r.Skip(wire);
        }
        return new SentencePieceModel
        {
            Pieces = pieces, ModelType = modelType, ByteFallback = byteFallback, SplitDigits = splitDigits,
            TreatWhitespaceAsSuffix = suffix, UnkId = unk, BosId = bos, EosId = eos, PadId = pad,
            NormalizerName = normName, PrecompiledCharsmapLength = charsmap, AddDummyPrefix = dummy,
            RemoveExtraWhitespaces = removeWs, EscapeWhitespaces = escapeWs,
        };
    }

    /// <summary>A minimal protobuf wire-format reader (varint, 32-bit, 64-bit, length-delimited).</summary>
    private ref struct WireReader(ReadOnlySpan<byte> data)
    {
        private readonly ReadOnlySpan<byte> _data = data;
        private int _pos;

        public readonly bool More => _pos < _data.Length;

        public (int Field, int Wire) Tag()
        {
            ulong t = Varint();
            return ((int)(t >> 3), (int)(t & 7));
        }

        public ulong Varint()
        {
            ulong v = 0;
            for (int shift = 0; ; shift += 7)
            {
                if (_pos >= _data.Length || shift > 63) throw new InvalidDataException("Truncated or invalid varint in the sentencepiece model protobuf.");
                byte b = _data[_pos++];
                v |= (ulong)(b & 0x7F) << shift;
                if ((b & 0x80) == 0) return v;
            }
        }

        public float Float()
        {
            Need(4);
            float f = BitConverter.ToSingle(_data.Slice(_pos, 4));
            _pos += 4;
            return f;
        }

        public ReadOnlySpan<byte> Bytes()
        {
            ulong len = Varint();
            if (len > (ulong)(_data.Length - _pos)) throw new InvalidDataException("A length-delimited field runs past the end of the sentencepiece model protobuf.");
            var s = _data.Slice(_pos, (int)len);
            _pos += (int)len;
            return s;
        }

        public void Skip(int wire)
        {
            switch (wire)
            {
                case 0: Varint(); break;
                case 1: Need(8); _pos += 8; break;
                case 2: Bytes(); break;
                case 5: Need(4); _pos += 4; break;
                default: throw new InvalidDataException($"Unsupported protobuf wire type {wire} in the sentencepiece model.");
            }
        }

        private readonly void Need(int n)
        {
            if (_pos + n > _data.Length) throw new InvalidDataException("Truncated sentencepiece model protobuf.");
        }
    }
}
