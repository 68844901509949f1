using Moe.Dsl;
using Moe.Runtime.Commands;

namespace Moe.Runtime.Data;

/// <summary>One training sample: inputs and targets of SequenceLength tokens, with Megatron's masks.</summary>
/// <param name="Tokens">Inputs t[0..S).</param>
/// <param name="Labels">Targets t[1..S] (position i predicts token i+1).</param>
/// <param name="LossMask">1 where the position counts; 0 where the input is end-of-document under eod_mask_loss.</param>
/// <param name="PositionIds">0..S-1, restarting after each end-of-document under reset_position_ids.</param>
/// <param name="DocumentIds">Document number of each position (increments after each end-of-document) when
/// reset_attention_mask asks for document-causal attention; all zero otherwise.</param>
public sealed record GptSample(long[] Tokens, long[] Labels, float[] LossMask, long[] PositionIds, long[] DocumentIds);

/// <summary>
/// <see cref="GptDataset.Batch"/>'s result: B samples laid out row-major as [B, S] arrays, ready for
/// <c>torch.tensor(array).view(B, S)</c>. Same meaning per row as <see cref="GptSample"/>.
/// </summary>
public sealed record GptBatch(int BatchSize, int SequenceLength, long[] Tokens, long[] Labels, float[] LossMask, long[] PositionIds, long[] DocumentIds);

/// <summary>
/// Walks a <see cref="GptDataset"/> in its (shuffled) sample order: each <see cref="Next"/> returns the
/// following micro-batch. Repeatable: the same dataset and seed give the same batches.
/// </summary>
public sealed class GptBatchIterator(GptDataset dataset, long firstSample = 0)
{
    /// <summary>Index of the next sample to hand out.</summary>
    public long Position { get; private set; } = firstSample;

    /// <summary>The next <paramref name="microBatchSize"/> samples; fails when the dataset has fewer left.</summary>
    public GptBatch Next(int microBatchSize)
    {
        var batch = dataset.Batch(Position, microBatchSize);
        Position += microBatchSize;
        return batch;
    }
}

/// <summary>Megatron's sample settings (--seq-length, --reset-position-ids, --reset-attention-mask, --eod-mask-loss).</summary>
public sealed record SampleOptions(int SequenceLength, int EodId, bool ResetPositionIds, bool ResetAttentionMask, bool EodMaskLoss)
{
    public static SampleOptions From(Dsl.Data data, int eodId) =>
        new(data.SequenceLength, eodId, data.ResetPositionIds, data.ResetAttentionMask, data.EodMaskLoss);
}

/// <summary>How a "990,9,1" split cuts a dataset's sequences into train, valid and test (Megatron's arithmetic).</summary>
public static class DataSplits
{
    /// <summary>
    /// [start, end) sequence ranges for train, valid, test, or null for a split whose weight is zero.
    /// Weights are normalised, cumulated into book-ends, and each bound is round(w·N) with round-half-to-even
    /// (Python's round, which Megatron uses).
    /// </summary>
    public static (long Start, long End)?[] Ranges(string split, long sequences)
    {
        if (!DataSplit.TryParse(split, out var w, out string error))
            throw new UserError($"Data.Split \"{split}\" is invalid: {error}.");
        var bounds = new double[4];
        for (int i = 0; i < 3; i++) bounds[i + 1] = bounds[i] + w[i];
        var result = new (long, long)?[3];
        for (int i = 0; i < 3; i++)
        {
            if (!(bounds[i + 1] > bounds[i])) continue;
            result[i] = ((long)Math.Round(bounds[i] * sequences, MidpointRounding.ToEven), (long)Math.Round(bounds[i + 1] * sequences, MidpointRounding.ToEven));
        }
        return result;
    }
}

/// <summary>
/// GPT-style samples over one split of an indexed dataset, as Megatron's GPTDataset builds them: the
/// split's sequences are shuffled per epoch (seeded), concatenated into one token stream, and cut into
/// samples of SequenceLength + 1 tokens that run across document boundaries (sample i starts at token
/// i·S); the order of samples is shuffled again. Sample i's inputs are its first S tokens, its labels the
/// last S. Masks follow gpt_dataset._get_ltor_masks_and_position_ids.
/// </summary>
public sealed class GptDataset
{
    private readonly IndexedDataset _data;
    private readonly IndexedDataset? _lossMask;
    private readonly SampleOptions _options;
    private readonly int[] _docOrder;
    private readonly (int DocPosition, int Offset)[] _sampleStarts;
    private readonly int[] _shuffle;

    public long SampleCount => _shuffle.Length;

    /// <param name="data">The indexed dataset.</param>
    /// <param name="range">Sequence indices of the split.</param>
    /// <param name="samples">How many samples the run will draw; epochs are added until they fit.</param>
    /// <param name="options">Sequence length and masks.</param>
    /// <param name="seed">Seeds the epoch and sample shuffles.</param>
    /// <param name="lossMask">For SFT data: a uint8 dataset aligned with <paramref name="data"/>, 1 on tokens the loss may predict.</param>
    public GptDataset(IndexedDataset data, (long Start, long End) range, int samples, SampleOptions options, int seed, IndexedDataset? lossMask = null)
    {
        _data = data;
        _lossMask = lossMask;
        if (lossMask is not null && !lossMask.Lengths.SequenceEqual(data.Lengths))
            throw new UserError($"{lossMask.Prefix} does not line up with {data.Prefix}: their sequence lengths differ; preprocess them together.");
        _options = options;
        int s = options.SequenceLength;
        var sequences = Enumerable.Range((int)range.Start, (int)(range.End - range.Start)).ToArray();
        long tokensPerEpoch = sequences.Sum(i => (long)data.Lengths[i]);
        if (tokensPerEpoch <= s)
            throw new UserError($"{data.Prefix}: the split holds {tokensPerEpoch} tokens, fewer than one sample of {s + 1}; use more data or a shorter Data.SequenceLength.");
        long needed = (long)samples * s + 1;
        int epochs = (int)((needed + tokensPerEpoch - 1) / tokensPerEpoch);
        var order = new List<int>(sequences.Length * epochs);
        for (int e = 0; e < epochs; e++)
        {
            var epoch = (int[])sequences.Clone();
            Shuffle(epoch, new Random(unchecked(seed * 1000003 + e)));
            order.AddRange(epoch);
        }
        _docOrder = order.ToArray();
        _sampleStarts = new (int, int)[samples];
        int docPos = 0, offset = 0;
        for (int i = 0; i < samples; i++)
        {
            while (offset >= data.Lengths[_docOrder[docPos]])
            {
                offset -= data.Lengths[_docOrder[docPos]];
                docPos++;
            }
            _sampleStarts[i] = (docPos, offset);
            offset += s;
        }
        _shuffle = Enumerable.Range(0, samples).ToArray();
        Shuffle(_shuffle, new Random(unchecked(seed + 7919)));
    }

    public GptSample Sample(long index)
    {
        var (docPos, offset) = _sampleStarts[_shuffle[index]];
        int s = _options.SequenceLength;
        var window = new long[s + 1];
        var maskWindow = _lossMask is null ? null : new long[s + 1];
        int filled = 0;
        while (filled < s + 1)
        {
            int seq = _docOrder[docPos];
            int take = Math.Min(_data.Lengths[seq] - offset, s + 1 - filled);
            if (take > 0)
            {
                _data.Read(seq, offset, take).CopyTo(window, filled);
                _lossMask?.Read(seq, offset, take).CopyTo(maskWindow!, filled);
            }
            filled += Math.Max(take, 0);
            docPos++;
            offset = 0;
        }
        var sample = Build(window, _options);
        if (maskWindow is not null)
            for (int i = 0; i < s; i++) sample.LossMask[i] *= maskWindow[i + 1]; // position i predicts token i+1
        return sample;
    }

    /// <summary>Samples [first, first + size) as one [size, S] batch.</summary>
    public GptBatch Batch(long first, int size)
    {
        if (size < 1) throw new ArgumentOutOfRangeException(nameof(size), size, "A batch needs at least one sample.");
        if (first < 0 || first + size > SampleCount)
            throw new ArgumentOutOfRangeException(nameof(first), first, $"Samples [{first}, {first + size}) lie outside the dataset's {SampleCount} samples.");
        int s = _options.SequenceLength;
        var b = new GptBatch(size, s, new long[size * s], new long[size * s], new float[size * s], new long[size * s], new long[size * s]);
        for (int i = 0; i < size; i++)
        {
            var x = Sample(first + i);
            x.Tokens.CopyTo(b.Tokens, i * s);
            x.Labels.CopyTo(b.Labels, i * s);
            x.LossMask.CopyTo(b.LossMask, i * s);
            x.PositionIds.CopyTo(b.PositionIds, i * s);
            x.DocumentIds.CopyTo(b.DocumentIds, i * s);
        }
        return b;
    }

    /// <summary>Inputs, labels and Megatron's masks from S + 1 consecutive tokens.</summary>
    public static GptSample Build(long[] window, SampleOptions o)
    {
        int s = window.Length - 1;
        var tokens = window[..s];
        var labels = window[1..];
        var loss = new float[s];
        var positions = new long[s];
        var documents = new long[s];
        long position = 0, document = 0;
        for (int i = 0; i < s; i++)
        {
            loss[i] = o.EodMaskLoss && tokens[i] == o.EodId ? 0f : 1f;
            positions[i] = o.ResetPositionIds ? position : i;
            documents[i] = o.ResetAttentionMask ? document : 0;
            position++;
            if (tokens[i] == o.EodId)
            {
                // Tokens after an end-of-document start a new document: positions restart, attention stops at the boundary.
                position = 0;
                document++;
            }
        }
        return new GptSample(tokens, labels, loss, positions, documents);
    }

    private static void Shuffle(int[] a, Random r)
    {
        for (int i = a.Length - 1; i > 0; i--)
        {
            int j = r.Next(i + 1);
            (a[i], a[j]) = (a[j], a[i]);
        }
    }
}
