namespace Moe.Dsl;

/// <summary>Training data: Megatron's indexed datasets (.bin/.idx) and how samples are packed.</summary>
public sealed record Data
{
    /// <summary>Dataset path prefix without .bin/.idx, e.g. "data/sft_text_document". Megatron: <c>--data-path</c>.</summary>
    public string? Prefix { get; init; }

    /// <summary>Train/valid/test weights, e.g. "990,9,1". Megatron: <c>--split</c> (its legacy default is "969, 30, 1").</summary>
    public string Split { get; init; } = "969,30,1";

    /// <summary>Tokens per sample. Megatron: <c>--seq-length</c>.</summary>
    public int SequenceLength { get; init; } = 4096;

    /// <summary>Restart position ids after each end-of-document token. Megatron: <c>--reset-position-ids</c>.</summary>
    public bool ResetPositionIds { get; init; }

    /// <summary>Document-causal attention: tokens cannot attend across an end-of-document token. Megatron: <c>--reset-attention-mask</c>.</summary>
    public bool ResetAttentionMask { get; init; }

    /// <summary>Exclude positions whose input token is end-of-document from the loss. Megatron: <c>--eod-mask-loss</c>.</summary>
    public bool EodMaskLoss { get; init; }

    /// <summary>Tokenizer file (SentencePiece tokenizer.model or Hugging Face tokenizer.json). Megatron: <c>--tokenizer-model</c>.</summary>
    public string? Tokenizer { get; init; }

    /// <summary>What the dataset holds: plain documents or SFT records with prompts masked out of the loss.</summary>
    public DataFormat Format { get; init; } = DataFormat.Pretraining;
}
