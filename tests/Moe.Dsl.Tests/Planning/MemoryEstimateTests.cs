using Moe.Dsl;
using Moe.Dsl.Planning;
using Moe.Dsl.Validation;
using Xunit;

namespace Moe.Dsl.Tests.Planning;

/// <summary>
/// The memory estimate against issue 16's arithmetic: full fine-tuning with Adam in bf16 holds 18 bytes per
/// parameter (bf16 weights 2, fp32 gradients 4, fp32 master weights 4, Adam moments 8; Megatron's
/// distributed-optimizer docs: 6 + 12/d bytes with d data-parallel ranks), so 8x22B's 141 B parameters need
/// about 2.5 TB before activations — more than 32 H100s can hold, less than 32 H200s.
/// </summary>
public class MemoryEstimateTests
{
    private static RecipeSettings OneGpu(Model model) => new()
    {
        Name = "One",
        Model = model,
        Parallelism = new Parallelism { Gpus = 1 },
        Data = new Data { SequenceLength = 4096 },
        Training = new Training { GlobalBatchSize = 1, MicroBatchSize = 1 },
    };

    private static double ModelState(MemoryEstimate m) => m.WeightsBytes + m.GradientsBytes + m.OptimizerBytes;

    [Fact]
    public void OneGpu_HoldsTheWholeModelAt18BytesPerParameter()
    {
        var mem = MemoryEstimate.For(OneGpu(Model.Mixtral8x22B));
        // 56 layers × (attention 6144·128·(2·48 + 2·8) = 88,080,384 + experts 8 · 3·6144·16384 = 2,415,919,104
        // + router 6144·8 = 49,152 + norms 2·6144) + untied embeddings 2 · 32768·6144 + final norm 6144.
        long byHand = 56L * (88_080_384 + 2_415_919_104 + 49_152 + 12_288) + 2L * 32768 * 6144 + 6144;
        Assert.Equal(140_630_071_296L, byHand);
        Assert.Equal(byHand, mem.ParametersPerGpu);
        Assert.Equal(18.0, ModelState(mem) / mem.ParametersPerGpu, precision: 12);
        // 18 × 140.6 B = 2.53 TB: the "about 2.3–2.5 TB" at its upper end.
        Assert.InRange(ModelState(mem), 2.5e12, 2.55e12);
    }

    [Fact]
    public void DistributedOptimizer_ShardsOptimizerStateOverDataParallel()
    {
        // 8x7B on 8 GPUs, data parallel only (expert DP 8 as well): 2 + 4 + 12/8 = 7.5 bytes per parameter.
        var s = OneGpu(Model.Mixtral8x7B) with { Parallelism = new Parallelism { Gpus = 8 }, Training = new Training { GlobalBatchSize = 8 } };
        var mem = MemoryEstimate.For(s);
        Assert.Equal(46_702_792_704L, mem.ParametersPerGpu);
        Assert.Equal(7.5, ModelState(mem) / mem.ParametersPerGpu, precision: 12);
    }

    /// <summary>Every layout of 8x22B on 32 GPUs that the rule set accepts (TP with sequence parallel, PP, EP, ETP).</summary>
    public static IEnumerable<RecipeSettings> Layouts8x22BOn32()
    {
        foreach (int tp in new[] { 1, 2, 4, 8 })
        foreach (int pp in new[] { 1, 2, 4, 8 })
        foreach (int ep in new[] { 1, 2, 4, 8 })
        foreach (int etp in new[] { 1, tp }.Distinct())
        {
            var s = new RecipeSettings
            {
                Name = "Layout",
                Model = Model.Mixtral8x22B,
                Parallelism = new Parallelism { Gpus = 32, Gpu = Gpu.H100, Tensor = tp, Pipeline = pp, Expert = ep, ExpertTensor = etp, SequenceParallel = tp > 1 },
                Data = new Data { SequenceLength = 4096 },
                Training = new Training { GlobalBatchSize = 256, MicroBatchSize = 1 },
            };
            if (RuleSet.Validate(s).All(f => f.Rule.DefaultSeverity != RuleSeverity.Error)) yield return s;
        }
    }

    [Fact]
    public void NoLayoutOf32H100s_Holds8x22B_Whereas32H200sDo()
    {
        var layouts = Layouts8x22BOn32().ToArray();
        Assert.True(layouts.Length >= 20, $"only {layouts.Length} layouts");
        // Whatever the layout, a GPU keeps at least 18 bytes × (8x22B's expert parameters) / 32 of expert state:
        // 56 · 2,415,919,104 = 135.3 B expert parameters → 76.1 GB, and the 4 GB allowance comes on top.
        double expertFloor = 18.0 * 56 * 2_415_919_104L / 32;
        Assert.InRange(expertFloor, 76.0e9, 76.2e9);
        foreach (var s in layouts)
        {
            var mem = MemoryEstimate.For(s);
            Assert.True(ModelState(mem) >= expertFloor, $"{Describe(s)}: {ModelState(mem) / 1e9:F1} GB of model state");
            Assert.False(mem.FitsOn(GpuSpec.H100), Describe(s));
            Assert.Contains(RuleSet.Validate(s), f => f.Rule.Id == DiagnosticIds.PlanDoesNotFitGpu);
        }
        Assert.Contains(layouts, s => MemoryEstimate.For(s).FitsOn(GpuSpec.H200));
    }

    private static string Describe(RecipeSettings s)
    {
        var p = s.Parallelism;
        return $"TP{p.Tensor} PP{p.Pipeline} EP{p.Expert} ETP{p.EffectiveExpertTensor}";
    }

    [Theory]
    [InlineData(typeof(Moe.Recipes.Mixtral8x7b), Gpu.H100)]
    [InlineData(typeof(Moe.Recipes.Mixtral8x22b), Gpu.H200)]
    public void ShippedRecipes_FitTheGpuTheyName(Type recipe, Gpu gpu)
    {
        var settings = ((Recipe)Activator.CreateInstance(recipe)!).ToSettings();
        Assert.Equal(gpu, settings.Parallelism.Gpu);
        var mem = MemoryEstimate.For(settings);
        Assert.True(mem.FitsOn(GpuSpec.Of(gpu)), $"{mem.TotalBytes / 1e9:F1} GB");
        Assert.DoesNotContain(RuleSet.Validate(settings), f => f.Rule.Id == DiagnosticIds.PlanDoesNotFitGpu);
    }

    [Fact]
    public void GpuNames_MapBothWays()
    {
        foreach (var spec in GpuSpec.All) Assert.Same(spec, GpuSpec.Of(spec.Member));
        Assert.Equal(Gpu.A100_40, GpuSpec.Find("a100-40")!.Member);
        Assert.Equal(141, GpuSpec.Of(Gpu.H200).MemoryGB);
    }
}
