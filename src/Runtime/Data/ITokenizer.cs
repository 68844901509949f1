namespace Moe.Runtime.Data;

/// <summary>
/// The one thing preprocessing needs from a tokenizer: text to ids, with the special ids Megatron's
/// <c>preprocess_data.py</c> uses (EOD appended with <c>--append-eod</c>). Implementations are
/// immutable after loading and safe to call from several threads at once.
/// </summary>
public interface ITokenizer
{
    /// <summary>Encodes <paramref name="text"/> with no BOS and no EOS (sentencepiece's <c>encode_as_ids</c>).</summary>
    int[] Encode(string text);

    /// <summary>Number of ids (pieces), which decides the .bin dtype (uint16 when &lt; 65500).</summary>
    int VocabSize { get; }

    /// <summary>End-of-document id (the EOS id: 2 for Mixtral).</summary>
    int EodId { get; }

    /// <summary>Beginning-of-sequence id, or -1 when the tokenizer has none.</summary>
    int BosId { get; }
}

/// <summary>Loads a tokenizer from a file, choosing the reader by name and content.</summary>
public static class Tokenizers
{
    /// <summary>
    /// <c>*.json</c> is read as a Hugging Face <c>tokenizer.json</c>; anything else as a SentencePiece
    /// <c>tokenizer.model</c> protobuf. Throws <see cref="InvalidDataException"/> for unsupported content.
    /// </summary>
    public static ITokenizer Load(string path)
    {
        if (path.EndsWith(".json", StringComparison.OrdinalIgnoreCase))
            return HuggingFaceBpeTokenizer.Load(path);
        return SentencePieceBpeTokenizer.Load(path);
    }
}
