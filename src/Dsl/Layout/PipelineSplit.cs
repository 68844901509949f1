using System;
using System.Collections.Generic;
using System.Linq;

namespace Moe.Dsl.Layout;

/// <summary>
/// Which transformer layers each pipeline stage owns, as Megatron-Core assigns them
/// (transformer_layer.py get_transformer_layer_offset): an even split, or uneven first/last stages
/// with the middle stages sharing the rest evenly; with a virtual pipeline of size v, the model is cut
/// into v chunks of L/v layers, each laid over the stages the same way.
/// </summary>
public static class PipelineSplit
{
    /// <summary>
    /// Layers per stage, or null when the split does not work out (the rule set says why):
    /// even (<paramref name="layers"/> divisible by <paramref name="stages"/>) or uneven with first/last counts.
    /// </summary>
    public static int[]? LayerCounts(int layers, int stages, int? firstStage = null, int? lastStage = null)
    {
        if (stages < 1 || layers < 1) return null;
        if (firstStage is null && lastStage is null)
            return layers % stages == 0 ? Enumerable.Repeat(layers / stages, stages).ToArray() : null;
        if (firstStage is int f0 && f0 < 1 || lastStage is int l0 && l0 < 1) return null;
        int fixedStages = (firstStage is null ? 0 : 1) + (lastStage is null ? 0 : 1);
        if (stages == 1 || fixedStages > stages) return null;
        int middleLayers = layers - (firstStage ?? 0) - (lastStage ?? 0);
        int middleStages = stages - fixedStages;
        if (middleLayers < 0 || (middleStages == 0) != (middleLayers == 0) || (middleStages > 0 && middleLayers % middleStages != 0)) return null;
        var counts = new int[stages];
        for (int i = 0; i < stages; i++) counts[i] = middleStages > 0 ? middleLayers / middleStages : 0;
        if (firstStage is int first) counts[0] = first;
        if (lastStage is int last) counts[stages - 1] = last;
        return counts;
    }

    /// <summary>
    /// The layers of <paramref name="stage"/>, one range per virtual chunk (a single range without a
    /// virtual pipeline). Throws <see cref="ArgumentException"/> for a split the rule set rejects.
    /// </summary>
    public static IReadOnlyList<LayerRange> LayersOfStage(int stage, int layers, int stages, int? virtualStages = null, int? firstStage = null, int? lastStage = null)
    {
        var counts = LayerCounts(layers, stages, firstStage, lastStage)
            ?? throw new ArgumentException($"{layers} layers cannot be split over {stages} pipeline stages with first {firstStage?.ToString() ?? "-"} and last {lastStage?.ToString() ?? "-"}.");
        if (stage < 0 || stage >= stages) throw new ArgumentOutOfRangeException(nameof(stage));
        int v = virtualStages ?? 1;
        if (v < 1 || counts.Any(c => c % v != 0))
            throw new ArgumentException($"Virtual pipeline {v} does not divide the stage layer counts ({string.Join(", ", counts)}).");
        var ranges = new List<LayerRange>(v);
        int chunkLayers = layers / v;
        for (int chunk = 0; chunk < v; chunk++)
        {
            int start = chunk * chunkLayers + counts.Take(stage).Sum() / v;
            ranges.Add(new LayerRange(start, counts[stage] / v));
        }
        return ranges;
    }
}

/// <summary>A contiguous run of layers: [<see cref="Start"/>, <see cref="Start"/> + <see cref="Count"/>).</summary>
public sealed record LayerRange(int Start, int Count)
{
    /// <summary>One past the last layer.</summary>
    public int End => Start + Count;

    /// <inheritdoc />
    public override string ToString() => Count == 0 ? "none" : Count == 1 ? $"layer {Start}" : $"layers {Start}–{End - 1}";
}

/// <summary>Which experts an expert-parallel rank owns (moe_layer.py): the contiguous block [r·E/EP, (r+1)·E/EP).</summary>
public static class ExpertSplit
{
    /// <summary>The global expert ids owned by <paramref name="epRank"/>; throws when EP does not divide the experts.</summary>
    public static LayerRange ExpertsOfRank(int epRank, int experts, int expertParallel)
    {
        if (expertParallel < 1 || experts % expertParallel != 0)
            throw new ArgumentException($"Expert parallel {expertParallel} does not divide {experts} experts.");
        if (epRank < 0 || epRank >= expertParallel) throw new ArgumentOutOfRangeException(nameof(epRank));
        int local = experts / expertParallel;
        return new LayerRange(epRank * local, local);
    }
}
