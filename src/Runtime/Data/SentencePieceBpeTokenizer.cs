using System.Text;

namespace Moe.Runtime.Data;

/// <summary>
/// Our own encoder for sentencepiece BPE models (Mixtral's tokenizer.model), giving sentencepiece's
/// <c>encode_as_ids</c> ids: normalise (identity normaliser only: optional extra-whitespace removal,
/// spaces escaped as U+2581, a dummy U+2581 prefix), split into user-defined symbols and single code
/// points, merge the adjacent pair whose concatenation is a piece with the highest score (ties: the
/// leftmost pair), then map pieces outside the vocabulary to their UTF-8 bytes (<c>&lt;0xNN&gt;</c>)
/// when byte fallback is on, else to unk. Digits stay split because a split-digits model has no
/// multi-digit pieces. Not supported (rejected at load): unigram models and precompiled normalisers
/// such as nmt_nfkc; the resegmentation of UNUSED pieces is not done.
/// </summary>
public sealed class SentencePieceBpeTokenizer : ITokenizer
{
    private const char Space = '\u2581';
    private readonly SentencePieceModel _model;
    private readonly Dictionary<string, int> _pieces = new(StringComparer.Ordinal);   // mergeable: normal, user-defined, unused
    private readonly Dictionary<string, int> _reserved = new(StringComparer.Ordinal); // control, unknown, byte
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _pieceSpans;
    private readonly float[] _scores;
    private readonly int[] _byteIds = new int[256];
    private readonly string[] _userDefined;

    private SentencePieceBpeTokenizer(SentencePieceModel model)
    {
        _model = model;
        _scores = new float[model.Pieces.Count];
        Array.Fill(_byteIds, -1);
        var user = new List<string>();
        for (int id = 0; id < model.Pieces.Count; id++)
        {
            var (piece, score, type) = model.Pieces[id];
            _scores[id] = score;
            if (type is PieceType.Normal or PieceType.UserDefined or PieceType.Unused) _pieces.TryAdd(piece, id);
            else _reserved.TryAdd(piece, id);
            if (type == PieceType.UserDefined) user.Add(piece);
            if (type == PieceType.Byte && piece.Length == 6 && piece.StartsWith("<0x", StringComparison.Ordinal) && piece.EndsWith('>'))
                _byteIds[Convert.ToInt32(piece.Substring(3, 2), 16)] = id;
        }
        _userDefined = [.. user.OrderByDescending(u => u.Length)];
        _pieceSpans = _pieces.GetAlternateLookup<ReadOnlySpan<char>>();
        if (model.ByteFallback && Array.IndexOf(_byteIds, -1) >= 0)
            throw new InvalidDataException("The sentencepiece model enables byte_fallback but lacks some of the 256 <0xNN> byte pieces.");
    }

    public int VocabSize => _model.Pieces.Count;
    public int EodId => _model.EosId;
    public int BosId => _model.BosId;

    /// <summary>The parsed model (options and pieces).</summary>
    public SentencePieceModel Model => _model;

    public static SentencePieceBpeTokenizer Load(string path) => FromBytes(File.ReadAllBytes(path));

    public static SentencePieceBpeTokenizer FromBytes(ReadOnlySpan<byte> data)
    {
        var model = SentencePieceModel.Parse(data);
        if (model.ModelType != 2)
            throw new InvalidDataException($"The sentencepiece model has model_type {model.ModelType}; only BPE (2) models such as Mixtral's are supported.");
        if (model.PrecompiledCharsmapLength > 0)
            throw new InvalidDataException($"The sentencepiece model uses the '{model.NormalizerName}' normaliser (a precompiled character map); only the identity normaliser is supported.");
        if (model.Pieces.Count == 0) throw new InvalidDataException("The sentencepiece model has no pieces.");
        return new SentencePieceBpeTokenizer(model);
    }

    public int[] Encode(string text)
    {
        string normalized = Normalize(text);
        if (normalized.Length == 0) return [];

        var symbols = new BpeMerger.Symbol[normalized.Length];
        int count = 0;
        for (int pos = 0; pos < normalized.Length;)
        {
            int len = MatchUserDefined(normalized, pos);
            if (len == 0) len = char.IsHighSurrogate(normalized[pos]) && pos + 1 < normalized.Length && char.IsLowSurrogate(normalized[pos + 1]) ? 2 : 1;
            symbols[count] = new BpeMerger.Symbol { Start = pos, Length = len, Id = -1, Prev = count - 1, Next = -1 };
            if (count > 0) symbols[count - 1].Next = count;
            count++;
            pos += len;
        }

        var lookup = _pieceSpans;
        var scores = _scores;
        BpeMerger.Merge(symbols, count, (ref BpeMerger.Symbol l, ref BpeMerger.Symbol r, out double priority, out int id) =>
        {
            if (lookup.TryGetValue(normalized.AsSpan(l.Start, l.Length + r.Length), out id))
            {
                priority = -scores[id];
                return true;
            }
            priority = 0;
            return false;
        });

        var ids = new List<int>(count);
        Span<byte> utf8 = stackalloc byte[16];
        for (int i = 0; i >= 0; i = symbols[i].Next)
        {
            ref var s = ref symbols[i];
            var piece = normalized.AsSpan(s.Start, s.Length);
            int id = PieceToId(piece);
            if (id == _model.UnkId && _model.ByteFallback)
            {
                int n = Encoding.UTF8.GetBytes(piece, utf8);
                for (int b = 0; b < n; b++) ids.Add(_byteIds[utf8[b]]);
            }
            else ids.Add(id);
        }
        return [.. ids];
    }

    private int PieceToId(ReadOnlySpan<char> piece)
    {
        if (_reserved.GetAlternateLookup<ReadOnlySpan<char>>().TryGetValue(piece, out int id)) return id;
        return _pieceSpans.TryGetValue(piece, out id) ? id : _model.UnkId;
    }

    private int MatchUserDefined(string text, int pos)
    {
        foreach (var u in _userDefined)
            if (string.CompareOrdinal(text, pos, u, 0, u.Length) == 0 && pos + u.Length <= text.Length) return u.Length;
        return 0;
    }

    /// <summary>sentencepiece's normaliser with the identity rule set (<c>normalizer.cc</c>).</summary>
    private string Normalize(string text)
    {
        if (_model.RemoveExtraWhitespaces)
        {
            var sb = new StringBuilder(text.Length);
            bool lastSpace = true; // drops leading spaces
            foreach (char c in text)
            {
                if (c == ' ') { if (!lastSpace) sb.Append(' '); lastSpace = true; }
                else { sb.Append(c); lastSpace = false; }
            }
            while (sb.Length > 0 && sb[^1] == ' ') sb.Length--;
            text = sb.ToString();
        }
        if (text.Length == 0) return "";
        if (_model.EscapeWhitespaces) text = text.Replace(' ', Space);
        if (_model.AddDummyPrefix)
            text = _model.TreatWhitespaceAsSuffix ? text + (_model.EscapeWhitespaces ? Space : ' ') : (_model.EscapeWhitespaces ? Space : ' ') + text;
        return text;
    }
}
