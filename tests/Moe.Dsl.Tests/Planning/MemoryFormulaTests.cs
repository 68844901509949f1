using Moe.Dsl;
using Moe.Dsl.Planning;
using Xunit;

namespace Moe.Dsl.Tests.Planning;

/// <summary>
/// The activation terms, routed rows and recompute formulas of docs/memory.md against hand arithmetic for
/// Mixtral 8x7B (h 4096, 32 heads × 128, 8 KV heads × 128, F 14336, 8 experts, top-2, vocabulary 32000).
/// </summary>
public class MemoryFormulaTests
{
    private static RecipeSettings OneGpu(int layers, int ep = 1, Capacity? capacity = null, Recompute? recompute = null) => new()
    {
        Name = "Formula",
        Model = Model.Mixtral8x7B with { Layers = layers },
        Parallelism = new Parallelism { Gpus = ep, Expert = ep, Gpu = Gpu.H200 },
        Capacity = capacity ?? Capacity.Dropless,
        Data = new Data { SequenceLength = 4096 },
        Training = new Training { GlobalBatchSize = ep, MicroBatchSize = 1 },
        Recompute = recompute ?? Recompute.Off,
    };

    [Fact]
    public void Terms_8x7B_ByHand()
    {
        var t = MemoryEstimate.Terms(OneGpu(2));
        Assert.Equal(3 * 4096 + 2 * 4096 + 2 * 1024, t.Attention);   // 22,528
        Assert.Equal(22_528, t.Attention);
        Assert.Equal(4096, t.MoeInput);
        Assert.Equal(3 * 4096 + 2 * 14336, t.PerRow);                  // 40,960
        Assert.Equal(40_960, t.PerRow);
        Assert.Equal(8192, t.Checkpoint);
    }

    [Theory]
    // dropless, T = 4096, k = 2: EP 1 → min(1.5·8192, 1·4096·min(2, 8)) = 8192 (skew stays on the GPU)
    [InlineData(1, 1.5, 8192)]
    // EP 8 (one expert a rank) → min(1.5·8192 = 12288, 8·4096·min(2, 1) = 32768) = 12288
    [InlineData(8, 1.5, 12288)]
    // EP 8 at skew 4 (= E/k, one expert takes every token) → min(32768, 32768)
    [InlineData(8, 4.0, 32768)]
    // EP 4 (two experts a rank) at skew 3 → min(3·8192 = 24576, 4·4096·2 = 32768) = 24576
    [InlineData(4, 3.0, 24576)]
    public void DroplessRows_AtSkew(int ep, double skew, double rows)
    {
        var s = OneGpu(2, ep, new Capacity { RoutingSkew = skew });
        Assert.Equal(rows, MemoryEstimate.RoutedRowsOf(s, 4096).Rows);
    }

    [Theory]
    // factor 1.25: C = ceil(4096·2/8·1.25) = ceil(1280) = 1280 per expert and source rank
    // padded: exactly 8·min(1280, 4096) = 10,240 rows, whatever EP
    [InlineData(1, true, 10240)]
    [InlineData(8, true, 10240)]
    // not padded, EP 8: min(10,240, 8·4096·1 = 32,768) = 10,240; EP 1: min(10,240, 4096·2 = 8192) = 8192
    [InlineData(8, false, 10240)]
    [InlineData(1, false, 8192)]
    public void CapacityRows_ExactBound(int ep, bool pad, double rows)
    {
        var s = OneGpu(2, ep, new Capacity { Factor = 1.25, PadToCapacity = pad, RoutingSkew = 4 });
        var (r, assumption) = MemoryEstimate.RoutedRowsOf(s, 4096);
        Assert.Equal(rows, r);
        Assert.Contains("capacity factor 1.25", assumption);
    }

    [Fact]
    public void CapacityRows_CapacityAboveTokens()
    {
        // T = 3, factor 2: C = ceil(3·2/8·2) = ceil(1.5) = 2; padded, each of 8 experts gets min(2, 3) = 2 rows: 16.
        var s = OneGpu(2, 1, new Capacity { Factor = 2, PadToCapacity = true });
        Assert.Equal(16, MemoryEstimate.RoutedRowsOf(s, 3).Rows);
    }

    // Two layers, one GPU, 4096 tokens, bf16 (2 bytes), rows R = 8192:
    //   layer = 4096·(22,528 + 4096) + 8192·40,960 = 109,051,904 + 335,544,320 = 444,596,224 elements
    //   loss  = 4096·32,000·4 = 524,288,000 bytes
    private const double Layer = 444_596_224, Loss = 524_288_000, Checkpoint = 4096.0 * 8192;

    [Fact]
    public void Activations_NoRecompute_ByHand()
    {
        Assert.Equal(4096.0 * (22_528 + 4096) + 8192.0 * 40_960, Layer);
        var mem = MemoryEstimate.For(OneGpu(2));
        Assert.Equal(2 * Layer * 2 + Loss, mem.ActivationsBytes);   // 2,302,672,896
        Assert.Equal(2_302_672_896, mem.ActivationsBytes);
        Assert.Equal(mem.ActivationsBytes, mem.ActivationsUniformBytes);   // one GPU: skew moves rows between its own experts
    }

    [Fact]
    public void BackwardWorkingSet_ByHand()
    {
        // One layer's backward (bf16): ∂gate/up of R = 8192 rows, 8192 · 2 · 14,336 · 2 bytes = 469,762,048, and the
        // gate/up weight gradient of the 8 experts before it lands, 8 · 2 · 14,336 · 4096 · 2 bytes = 1,879,048,192.
        var mem = MemoryEstimate.For(OneGpu(2));
        Assert.Equal(1_879_048_192, mem.BackwardWeightGradientBytes);
        Assert.Equal(469_762_048.0 + 1_879_048_192, mem.BackwardBytes);
        Assert.Equal(mem.WeightsBytes + mem.GradientsBytes + mem.OptimizerBytes + mem.ActivationsBytes + mem.BackwardBytes + mem.OverheadBytes, mem.TotalBytes);
        // Expert parallel 4: each rank holds 2 experts; dropless at the default skew 1.5 the
        // most loaded rank gets min(1.5 · 4096 · 2, 4 · 4096 · min(2, 2)) = 12,288 rows.
        var ep = MemoryEstimate.For(OneGpu(2, ep: 4));
        Assert.Equal(2 * 2 * 14_336 * 4096 * 2.0, ep.BackwardWeightGradientBytes);
        Assert.Equal(12_288 * 2 * 14_336 * 2.0 + ep.BackwardWeightGradientBytes, ep.BackwardBytes);
    }

    [Fact]
    public void Activations_FullUniform1_ByHand()
    {
        // 2 chunks × 4096·8192 (checkpoints) + one layer rerun: 67,108,864 + 444,596,224 = 511,705,088 elements.
        var mem = MemoryEstimate.For(OneGpu(2, recompute: Recompute.FullEveryLayer));
        Assert.Equal((2 * Checkpoint + Layer) * 2 + Loss, mem.ActivationsBytes);
        Assert.Equal(1_547_698_176, mem.ActivationsBytes);
    }

    [Fact]
    public void Activations_FullBlock1_ByHand()
    {
        // 1 checkpoint + the other layer's activations: 33,554,432 + 444,596,224 = 478,150,656 elements.
        var mem = MemoryEstimate.For(OneGpu(2, recompute: new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Block, NumLayers = 1 }));
        Assert.Equal(1_480_589_312, mem.ActivationsBytes);
    }

    [Theory]
    // A stage of 4 layers; with a virtual pipeline of 2 each model chunk of 2 layers applies the method itself.
    // uniform 3: ⌈4/3⌉ = 2 units, a rerun of 3 layers | per chunk ⌈2/3⌉ = 1 unit (2 in all), a rerun of min(3, 2) = 2.
    [InlineData(RecomputeMethod.Uniform, 3, 1, 2, 3)]
    [InlineData(RecomputeMethod.Uniform, 3, 2, 2, 2)]
    // block 2: the stage's first 2 recomputed, 2 kept | each chunk's 2 recomputed (4 in all), one rerun layer.
    [InlineData(RecomputeMethod.Block, 2, 1, 2, 2)]
    [InlineData(RecomputeMethod.Block, 2, 2, 4, 1)]
    public void Activations_FullRecomputePerModelChunk_ByHand(RecomputeMethod method, int n, int modelChunks, int checkpoints, int layersKept)
    {
        var t = MemoryEstimate.Terms(OneGpu(2));
        var r = new Recompute { Granularity = RecomputeGranularity.Full, Method = method, NumLayers = n };
        Assert.Equal(checkpoints * Checkpoint + layersKept * Layer, MemoryEstimate.StageActivations(r, 4, 4096, 8192, t, modelChunks));
    }

    [Fact]
    public void Activations_FullRecomputeUnderVirtualPipeline_AppliesTheMethodPerModelChunk()
    {
        // 8 layers over PP 2 × VPP 2: stages of 4 layers in chunks of 2; block 2 recomputes all 4 (4 checkpoints, one
        // rerun layer), not the stage's first 2. One micro-batch in flight (gradient accumulation 1).
        var s = OneGpu(8, recompute: new Recompute { Granularity = RecomputeGranularity.Full, Method = RecomputeMethod.Block, NumLayers = 2 }) with
        {
            Parallelism = new Parallelism { Gpus = 2, Pipeline = 2, VirtualPipeline = 2, Gpu = Gpu.H200 },
            Training = new Training { GlobalBatchSize = 1, MicroBatchSize = 1 },
        };
        Assert.Equal((4 * Checkpoint + Layer) * 2 + Loss, MemoryEstimate.For(s).ActivationsBytes);
    }

    [Fact]
    public void Activations_SelectiveMoe_ByHand()
    {
        // per layer 4096·(22,528 + 4096 + 4096) = 125,829,120; two layers + one rerun's rows 335,544,320 = 587,202,560 elements.
        var mem = MemoryEstimate.For(OneGpu(2, recompute: new Recompute { Granularity = RecomputeGranularity.Selective, Modules = RecomputeModules.Moe }));
        Assert.Equal(587_202_560.0 * 2 + Loss, mem.ActivationsBytes);
        Assert.Equal(1_698_693_120, mem.ActivationsBytes);
    }

    [Fact]
    public void Activations_ExpertParallelSkew_ByHand()
    {
        // EP 8 at skew 1.5: R = 12,288 rows, layer = 109,051,904 + 12,288·40,960 = 612,368,384 elements;
        // uniform: R = 8192, layer = 444,596,224.
        var mem = MemoryEstimate.For(OneGpu(2, ep: 8));
        Assert.Equal(12_288, mem.RoutedRows);
        Assert.Equal(8192, mem.RoutedRowsUniform);
        Assert.Equal(2 * 612_368_384.0 * 2 + Loss, mem.ActivationsBytes);
        Assert.Equal(2 * Layer * 2 + Loss, mem.ActivationsUniformBytes);
    }
}
