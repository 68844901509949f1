using System.Globalization;
using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Data;

namespace Moe.Runtime.Training;

/// <summary>
/// What <c>train --simulate</c> runs: the recipe's exact topology (every rank a thread, the CPU as device, the
/// in-process backend), with a model, sequence and batch small enough for a laptop when the recipe's are
/// not. A shrunken model stays in its family: the same experts and top-k, the same grouped-query ratio, a
/// layer count the pipeline split accepts, sizes every parallel degree divides. Each change is a note the run
/// prints, so nobody mistakes the simulation for the job.
/// </summary>
/// <param name="Settings">The settings the simulation trains with.</param>
/// <param name="Notes">What was changed from the recipe, one line each.</param>
/// <param name="SyntheticData">True when the recipe's data is absent and seeded random tokens stand in.</param>
public sealed record SimulationPlan(RecipeSettings Settings, IReadOnlyList<string> Notes, bool SyntheticData)
{
    /// <summary>Models with more parameters than this are shrunk.</summary>
    public const long MaxParameters = 50_000_000;

    /// <summary>Longer samples are cut to this many tokens.</summary>
    public const int MaxSequence = 256;

    /// <summary>The plan for <paramref name="s"/>; <paramref name="dataExists"/> says whether its dataset is on disk.</summary>
    public static SimulationPlan For(RecipeSettings s, bool dataExists)
    {
        var notes = new List<string>();
        var p = s.Parallelism;
        var m = s.Model;
        if (Parameters(m) > MaxParameters)
        {
            int tp = p.Tensor;
            int ratio = Math.Max(1, m.AttentionHeads / Math.Max(1, m.KeyValueHeads));
            // Tensor beyond the key-value heads keeps them (each rank a replica of one group, R017), so the simulation
            // runs the replication the job will; otherwise one group per tensor rank.
            bool replicated = m.KeyValueHeads > 0 && tp > m.KeyValueHeads && tp % m.KeyValueHeads == 0;
            int kv = replicated ? m.KeyValueHeads : Math.Max(1, tp);
            int heads = kv * ratio;
            const int headDim = 8;
            int hidden = heads * headDim;
            int etp = p.EffectiveExpertTensor;
            int ffn = RoundUp(2 * hidden, 16 * Math.Max(tp, etp));
            int layers = SmallestLayerCount(m.Layers, p);
            var shrunk = m with
            {
                HiddenSize = hidden, AttentionHeads = heads, KeyValueHeads = kv, HeadDim = headDim,
                IntermediateSize = ffn, Layers = layers, MaxPositionEmbeddings = Math.Min(m.MaxPositionEmbeddings, 4096),
            };
            notes.Add(string.Create(CultureInfo.InvariantCulture,
                $"model shrunk within its family ({m.Name}, {Parameters(m) / 1e9:F1} B parameters → {Parameters(shrunk) / 1e6:F1} M): hidden {m.HiddenSize} → {hidden}, " +
                $"heads {m.AttentionHeads}/{m.KeyValueHeads} → {heads}/{kv} (grouped-query ratio {ratio} kept), head dim {m.EffectiveHeadDim} → {headDim}, " +
                $"expert FFN {m.IntermediateSize} → {ffn}, layers {m.Layers} → {layers}; experts {m.Experts}, top-{s.TopK} and vocabulary {m.VocabSize} kept"));
            s = s with { Model = shrunk };
            if (s.Checkpoint.Load is string load)
            {
                // The recipe's weights are the full model's; the shrunk one starts from the seed instead.
                notes.Add($"checkpoint: {load} not loaded (its weights are the full model's), the shrunk model is initialised from seed {s.Training.Seed}");
                s = s with { Checkpoint = s.Checkpoint with { Load = null } };
            }
        }
        int sequence = s.Data.SequenceLength;
        if (sequence > MaxSequence)
        {
            int multiple = 2 * p.Context * p.Tensor;
            int shorter = Math.Max(multiple, MaxSequence / multiple * multiple);
            notes.Add($"sequence {sequence} → {shorter} tokens");
            s = s with { Data = s.Data with { SequenceLength = shorter } };
        }
        int dp = p.DataParallel;
        int microBatches = Math.Max(1, p.Pipeline) * (p.VirtualPipeline ?? 1);
        int smallest = s.Training.MicroBatchSize * dp * microBatches;
        if (s.Training.GlobalBatchSize > 4 * smallest)
        {
            notes.Add($"global batch {s.Training.GlobalBatchSize} → {smallest} samples ({microBatches} micro-batch(es) of {s.Training.MicroBatchSize} per data-parallel rank)");
            s = s with { Training = s.Training with { GlobalBatchSize = smallest } };
        }
        if (s.Training.WarmupSteps > s.Training.Steps)
            s = s with { Training = s.Training with { WarmupSteps = s.Training.Steps } };
        bool synthetic = !dataExists;
        if (synthetic)
        {
            notes.Add($"data: seeded random tokens ({(s.Data.Prefix is null ? "the recipe names no dataset" : $"{s.Data.Prefix}.bin/.idx not found")})");
            s = s with { Data = s.Data with { Prefix = null, Tokenizer = null } };
        }
        return new SimulationPlan(s, notes, synthetic);
    }

    /// <summary>Parameters of a Mixtral-family model (embeddings, attention, router, experts, norms, LM head).</summary>
    public static long Parameters(Model m)
    {
        long h = m.HiddenSize, d = m.EffectiveHeadDim;
        long attention = h * (m.AttentionHeads + 2L * m.KeyValueHeads) * d + (long)m.AttentionHeads * d * h;
        long experts = (long)m.Experts * 3 * h * m.IntermediateSize;
        long perLayer = attention + experts + (long)m.Experts * h + 2 * h;
        return (long)m.Layers * perLayer + 2L * m.VocabSize * h + h;
    }

    /// <summary>The fewest layers (at least one per stage and virtual chunk) that the recipe's pipeline split accepts.</summary>
    private static int SmallestLayerCount(int layers, Parallelism p)
    {
        int v = p.VirtualPipeline ?? 1;
        for (int candidate = 1; candidate <= layers; candidate++)
        {
            var counts = PipelineSplit.LayerCounts(candidate, p.Pipeline, p.FirstStageLayers, p.LastStageLayers);
            if (counts is not null && counts.All(c => c >= v && c % v == 0)) return candidate;
        }
        return layers;
    }

    private static int RoundUp(int value, int multiple) => (value + multiple - 1) / multiple * multiple;
}

/// <summary>Seeded random tokens with the recipe's shapes, for simulations without the recipe's dataset.</summary>
public sealed class SyntheticSampleSource(int vocabulary, int sequenceLength, int seed) : ISampleSource
{
    public GptSample Sample(long index)
    {
        var random = new Random(unchecked(seed * 7919 + (int)index * 104729));
        var stream = new long[sequenceLength + 1];
        for (int i = 0; i < stream.Length; i++) stream[i] = random.Next(3, vocabulary);
        return new GptSample(stream[..^1], stream[1..], Enumerable.Repeat(1f, sequenceLength).ToArray(),
            Enumerable.Range(0, sequenceLength).Select(i => (long)i).ToArray(), new long[sequenceLength]);
    }

    public void Dispose()
    {
    }
}
