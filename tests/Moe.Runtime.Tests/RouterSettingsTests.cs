using Moe.Dsl;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>
/// Group-limited routing, the router dtype, the aux-loss-free expert bias and the capacity corner cases, on
/// cases small enough to work out by hand (Megatron-Core 0.20 moe_utils.py / router.py semantics). With a
/// hidden size of 1 and h = 1 the logits are the gate column itself, so each case states its logits.
/// </summary>
public class RouterSettingsTests
{
    /// <summary>Routes one token whose logits are <paramref name="logits"/> (gate column, h = 1).</summary>
    private static Routing RouteLogits(MoeOptions options, float[] logits, Tensor? bias = null) =>
        TopKRouter.Route(torch.ones(1, 1), torch.tensor(logits).view(logits.Length, 1), options, bias);

    private static long[] Sorted(Tensor ids) => ids.flatten().data<long>().ToArray().Order().ToArray();

    private static double[] D(Tensor t) => t.to(ScalarType.Float64).flatten().data<double>().ToArray();

    [Fact]
    public void GroupLimitedSoftmax_ScoresGroupsByTheSumOfTheirTopLogits()
    {
        // E 4 in G 2 groups {0,1} {2,3}, GroupTopK 1, K 2. Post-softmax routing ranks logits, so each group
        // scores the sum of its top K/GroupTopK = 2 logits: 3 + (−10) = −7 against 1 + 1 = 2; group {2,3}
        // wins and the weights are softmax(1, 1) = (0.5, 0.5). Plain top-2 would take expert 0 (logit 3).
        var options = new MoeOptions { TopK = 2, NumGroups = 2, GroupTopK = 1 };
        var r = RouteLogits(options, [3f, -10f, 1f, 1f]);
        Assert.Equal(new long[] { 2, 3 }, Sorted(r.ExpertsTK));
        Assert.Equal(new[] { 0.5, 0.5 }, D(r.WeightsTK), new ToleranceComparer(1e-7));
        Assert.Contains(0L, Sorted(RouteLogits(options with { GroupTopK = null, NumGroups = null }, [3f, -10f, 1f, 1f]).ExpertsTK));
    }

    [Fact]
    public void GroupLimitedPreSoftmax_ScoresGroupsByTheirProbabilities()
    {
        // Same logits with pre-softmax: p = softmax(3, −10, 1, 1) = e^z / (e³ + e⁻¹⁰ + 2e)
        //   = (20.0855, 4.54e−5, 2.71828, 2.71828) / 25.52215 = (0.786985, 1.7788e−6, 0.106507, 0.106507).
        // Group sums 0.786987 against 0.213014: now group {0,1} wins, and the weights are p0, p1 unnormalised.
        var r = RouteLogits(new MoeOptions { TopK = 2, PreSoftmax = true, NumGroups = 2, GroupTopK = 1 }, [3f, -10f, 1f, 1f]);
        Assert.Equal(new long[] { 0, 1 }, Sorted(r.ExpertsTK));
        var w = D(r.WeightsTK).Order().ToArray();
        Assert.Equal(1.7788445e-6, w[0], 1e-11);
        Assert.Equal(0.78698464, w[1], 1e-6);
    }

    [Fact]
    public void GroupLimitedSigmoid_KeepsTheGroupWithTheLargerScoreSum()
    {
        // σ(2, −2, 0.6, 0.4) = (0.880797, 0.119203, 0.645656, 0.598688): group sums 1.000000 and 1.244344, so
        // group {2,3} wins although expert 0 has the best score; weights 0.645656/1.244344 = 0.518873 and
        // 0.598688/1.244344 = 0.481127.
        var r = RouteLogits(new MoeOptions { TopK = 2, ScoreFunction = ScoreFunction.Sigmoid, NumGroups = 2, GroupTopK = 1 }, [2f, -2f, 0.6f, 0.4f]);
        Assert.Equal(new long[] { 2, 3 }, r.ExpertsTK.data<long>().ToArray());
        Assert.Equal(new[] { 0.51887285, 0.48112715 }, D(r.WeightsTK), new ToleranceComparer(1e-6));
    }

    [Fact]
    public void GroupLimited_ChoosesTheTopKOfTheKeptGroupsNotOnePerGroup()
    {
        // E 8 in G 4 groups of 2, GroupTopK 2, K 2: each group scores its top K/GroupTopK = 1 logit:
        // groups (4, 3.5) → 4, (3, 0) → 3, (−1, −1) → −1, (−2, −2) → −2. Groups 0 and 1 are kept, and the top-2
        // of experts 0..3 are 0 and 1, both of group 0. Weights softmax(4, 3.5) = (0.622459, 0.377541).
        var r = RouteLogits(new MoeOptions { TopK = 2, NumGroups = 4, GroupTopK = 2 }, [4f, 3.5f, 3f, 0f, -1f, -1f, -2f, -2f]);
        Assert.Equal(new long[] { 0, 1 }, r.ExpertsTK.data<long>().ToArray());
        Assert.Equal(new[] { 0.62245933, 0.37754067 }, D(r.WeightsTK), new ToleranceComparer(1e-6));
    }

    [Fact]
    public void RouterDtypeFp64_ComputesTheGatingAndSelectionInDoublePrecision()
    {
        // h = (1, 1e−10) in fp32 (1e−10 is 1.00000001335e−10 there); gate rows (2, 0), (1, 0), (1, 1).
        // Logits in fp64: (2, 1, 1 + 1.0000000134e−10): the top-2 are experts 0 and 2. In fp32, 1 + 1e−10
        // rounds to 1, so experts 1 and 2 tie. Post-softmax weights: softmax(2, 1 + 1e−10) computed in fp32
        // (Megatron's softmax(dtype=float32)) = (σ(1), 1 − σ(1)) = (0.7310586, 0.2689414), then cast to fp64.
        var hidden = torch.tensor(new float[] { 1f, 1e-10f }).view(1, 2);
        var gate = torch.tensor(new float[] { 2, 0, 1, 0, 1, 1 }).view(3, 2);
        var r = TopKRouter.Route(hidden, gate, new MoeOptions { TopK = 2, RouterDtype = RouterDtype.Fp64 });
        Assert.Equal(ScalarType.Float64, r.LogitsTE.dtype);
        Assert.Equal(ScalarType.Float64, r.WeightsTK.dtype);
        var z = D(r.LogitsTE);
        Assert.Equal(1.00000001335e-10, z[2] - z[1], 2.3e-16);   // exact up to fp64's spacing at 1, 2.2e−16
        Assert.Equal(new long[] { 0, 2 }, r.ExpertsTK.data<long>().ToArray());
        Assert.Equal(new[] { 0.7310586, 0.2689414 }, D(r.WeightsTK), new ToleranceComparer(1e-7));

        var fp32 = TopKRouter.Route(hidden, gate, new MoeOptions { TopK = 2, RouterDtype = RouterDtype.Fp32 });
        Assert.Equal(ScalarType.Float32, fp32.LogitsTE.dtype);
        var z32 = D(fp32.LogitsTE);
        Assert.Equal(z32[1], z32[2]);   // the difference is lost in single precision
        Assert.Equal(ScalarType.Float64, AuxLosses.ZLoss(r.LogitsTE).dtype);
    }

    [Fact]
    public void RouterDtypeFp32_RaisesBf16GatingToSinglePrecision()
    {
        // bf16 model: without a router dtype the logits and weights stay bf16 (Megatron casts probs to the
        // logits' type); with fp32 the matmul runs on fp32 copies of the bf16 input and weight.
        var hidden = torch.ones(2, 4, dtype: ScalarType.BFloat16);
        var gate = torch.arange(12, dtype: ScalarType.Float32).view(3, 4).to(ScalarType.BFloat16);
        var plain = TopKRouter.Route(hidden, gate, new MoeOptions { TopK = 2 });
        Assert.Equal(ScalarType.BFloat16, plain.LogitsTE.dtype);
        Assert.Equal(ScalarType.BFloat16, plain.WeightsTK.dtype);
        var fp32 = TopKRouter.Route(hidden, gate, new MoeOptions { TopK = 2, RouterDtype = RouterDtype.Fp32 });
        Assert.Equal(ScalarType.Float32, fp32.LogitsTE.dtype);
        Assert.Equal(ScalarType.Float32, fp32.WeightsTK.dtype);
        // Row e of the gate is 4e, 4e+1, 4e+2, 4e+3 → logit 16e + 6: (6, 22, 38), exact in both dtypes.
        Assert.Equal(new[] { 6.0, 22, 38, 6, 22, 38 }, D(fp32.LogitsTE));
    }

    [Fact]
    public void ExpertBias_ChangesTheSelectionButNotTheWeights()
    {
        // σ(0, 0.1, 0.2, 0.3) = (0.5, 0.524979, 0.549834, 0.574443); bias (0.5, 0, 0, 0) makes the selection
        // scores (1.0, 0.524979, 0.549834, 0.574443): top-2 = experts 0 and 3. Weights from the unbiased
        // scores: 0.5 / 1.074443 = 0.465358 and 0.574443 / 1.074443 = 0.534642.
        var options = new MoeOptions { TopK = 2, ScoreFunction = ScoreFunction.Sigmoid, ExpertBias = true };
        var r = RouteLogits(options, [0f, 0.1f, 0.2f, 0.3f], torch.tensor(new float[] { 0.5f, 0, 0, 0 }));
        Assert.Equal(new long[] { 0, 3 }, r.ExpertsTK.data<long>().ToArray());
        Assert.Equal(new[] { 0.46535761, 0.53464239 }, D(r.WeightsTK), new ToleranceComparer(1e-6));
        // The aux losses count the plain top-2 of the scores (3 and 2), not the biased choice.
        Assert.Equal(new long[] { 3, 2 }, r.AuxExpertsTK.data<long>().ToArray());
    }

    [Fact]
    public void ExpertBiasAuxLoss_CountsThePlainTopKOfTheScores()
    {
        // The case above through a layer: normalised scores p = σ / 2.149256; the switch loss with T = 1,
        // K = 2, E = 4 is E/(K·T²) · Σ_e p_e·c_e = 2 · (p3 + p2) = 2 · 1.124277 / 2.149256 = 1.046201
        // (counting the biased choice 0 and 3 instead would give 0.999828).
        using var layer = new MoeLayer(4, 1, 1, new MoeOptions { TopK = 2, ScoreFunction = ScoreFunction.Sigmoid, ExpertBias = true, AuxLossConvention = AuxLossConvention.Megatron }, ScalarType.Float32, CPU);
        using (torch.no_grad())
        {
            layer.Gate.copy_(torch.tensor(new float[] { 0f, 0.1f, 0.2f, 0.3f }).view(4, 1));
            layer.ExpertWeights.GateUp.fill_(1);
            layer.ExpertWeights.Down.fill_(1);
            layer.ExpertBias!.BiasE.copy_(torch.tensor(new float[] { 0.5f, 0, 0, 0 }));
        }
        var o = layer.Forward(torch.ones(1, 1));
        Assert.Equal(1.0462008, layer.MegatronAuxLoss(o, 1).item<float>(), 5);
    }

    [Fact]
    public void ExpertBiasUpdate_MovesTowardsBalanceFromTheCountsSinceTheLastUpdate()
    {
        // H 1, gate (−1, 0, 0.5, 1), sigmoid top-1: h = +1 gives logits (−1, 0, 0.5, 1) → expert 3;
        // h = −1 gives (1, 0, −0.5, −1) → expert 0. Two micro-batches with gradients: (+1, +1, +1) and
        // (−1, +1): counts (1, 0, 0, 4), mean 5/4 = 1.25, mean − count = (0.25, 1.25, 1.25, −2.75), sign
        // (+, +, +, −): with rate 0.01 the bias becomes (0.01, 0.01, 0.01, −0.01). A forward without
        // gradients (evaluation) is not counted.
        var options = new MoeOptions { TopK = 1, ScoreFunction = ScoreFunction.Sigmoid, ExpertBias = true, BiasUpdateRate = 0.01 };
        using var layer = new MoeLayer(4, 1, 1, options, ScalarType.Float32, CPU);
        using (torch.no_grad())
        {
            layer.Gate.copy_(torch.tensor(new float[] { -1f, 0f, 0.5f, 1f }).view(4, 1));
            layer.ExpertWeights.GateUp.fill_(1);
            layer.ExpertWeights.Down.fill_(1);
        }
        layer.train();
        using (torch.no_grad()) layer.Forward(torch.ones(7, 1));
        Assert.Equal(new[] { 0.0, 0, 0, 0 }, D(layer.ExpertBias!.CountsE));
        layer.Forward(torch.tensor(new float[] { 1, 1, 1 }).view(3, 1));
        layer.Forward(torch.tensor(new float[] { -1, 1 }).view(2, 1));
        Assert.Equal(new[] { 1.0, 0, 0, 4 }, D(layer.ExpertBias.CountsE));
        layer.UpdateExpertBias();
        Assert.Equal(new[] { 0.01, 0.01, 0.01, -0.01 }, D(layer.ExpertBias.BiasE), new ToleranceComparer(1e-9));
        Assert.Equal(new[] { 0.0, 0, 0, 0 }, D(layer.ExpertBias.CountsE));

        // The bias now steers: h = 0.01 gives σ(−0.01, 0, 0.005, 0.01) = (0.4975, 0.5, 0.50125, 0.5025); plus the
        // bias (0.5075, 0.51, 0.51125, 0.4925) → expert 2 (expert 3 without it), weight σ(0.005) = 0.5012500.
        var r = layer.Forward(torch.tensor(new float[] { 0.01f }).view(1, 1)).Routing;
        Assert.Equal(2L, r.ExpertsTK.item<long>());
        Assert.Equal(0.50125, r.WeightsTK.item<float>(), 6);

        // A layer in evaluation mode only clears its counts (Megatron updates routers in training mode only).
        layer.eval();
        layer.UpdateExpertBias();
        Assert.Equal(new[] { 0.01, 0.01, 0.01, -0.01 }, D(layer.ExpertBias.BiasE), new ToleranceComparer(1e-9));
        Assert.Equal(new[] { 0.0, 0, 0, 0 }, D(layer.ExpertBias.CountsE));
    }

    [Fact]
    public void ExpertBiasCounts_IncludeCapacityPaddingAndExcludeDrops()
    {
        // 4 tokens, top-1, E 2, factor 1.0: capacity ceil(4·1/2) = 2. All four pick expert 1 (h = +1, gate
        // (−1, 1)): expert 1 keeps 2 and drops 2. Megatron counts the router's final map: without padding
        // (0, 2); with padding every column holds the capacity: (2, 2).
        foreach (var (pad, expected) in new[] { (false, new[] { 0.0, 2 }), (true, new[] { 2.0, 2 }) })
        {
            using var layer = new MoeLayer(2, 1, 1, new MoeOptions { TopK = 1, ScoreFunction = ScoreFunction.Sigmoid, ExpertBias = true, CapacityFactor = 1.0, PadToCapacity = pad }, ScalarType.Float32, CPU);
            using (torch.no_grad())
            {
                layer.Gate.copy_(torch.tensor(new float[] { -1f, 1f }).view(2, 1));
                layer.ExpertWeights.GateUp.fill_(1);
                layer.ExpertWeights.Down.fill_(1);
            }
            layer.Forward(torch.ones(4, 1));
            Assert.Equal(expected, D(layer.ExpertBias!.CountsE));
        }
    }

    [Fact]
    public void ModelUpdateExpertBias_UsesEveryLayersCountsOfTheStep()
    {
        // Each layer counts T·K = 2·4·2 = 16 pairs per forward; after the update every bias entry is ±rate or 0
        // (sign of mean − count) and the counts are zero.
        var config = MixtralConfig.From(Model.TinyMixtral);
        var options = new MoeOptions { TopK = config.TopK, ScoreFunction = ScoreFunction.Sigmoid, ExpertBias = true, BiasUpdateRate = 0.5, AuxLossConvention = AuxLossConvention.Megatron };
        using var model = MixtralModel.Random(config, 3, ScalarType.Float32, CPU, options);
        model.train();
        var ids = torch.arange(8, dtype: ScalarType.Int64).view(2, 4);
        model.Forward(ids, returnLogits: false);
        Assert.All(model.Layers, l => Assert.Equal(16.0, l.Moe.ExpertBias!.CountsE.sum().item<float>()));
        model.UpdateExpertBias();
        Assert.All(model.Layers, l =>
        {
            Assert.All(D(l.Moe.ExpertBias!.BiasE), b => Assert.Contains(b, new[] { -0.5, 0, 0.5 }));
            Assert.Equal(0.0, l.Moe.ExpertBias.CountsE.abs().sum().item<float>());
        });
        Assert.Contains(model.Layers, l => D(l.Moe.ExpertBias!.BiasE).Any(b => b != 0));
    }

    [Fact]
    public void ExpertBias_SurvivesACheckpointAndIsNotSilentlyDropped()
    {
        // Saved as model.layers.{l}.block_sparse_moe.gate.e_score_correction_bias (DeepSeek-V3's hub name);
        // loaded back into a model with the bias; refused by a model without it.
        var config = MixtralConfig.From(Model.TinyMixtral);
        var withBias = new MoeOptions { TopK = config.TopK, ScoreFunction = ScoreFunction.Sigmoid, ExpertBias = true };
        string dir = Directory.CreateTempSubdirectory("moe-bias-").FullName;
        try
        {
            using var model = MixtralModel.Random(config, 5, ScalarType.Float32, CPU, withBias);
            using (torch.no_grad())
                for (int l = 0; l < config.Layers; l++) model.Layers[l].Moe.ExpertBias!.BiasE.copy_(torch.tensor(new float[] { l, -l, 0.5f, -0.25f }));
            Moe.Runtime.Checkpoints.MixtralStateDictAdapter.Save(model, dir);

            using var loaded = Moe.Runtime.Checkpoints.MixtralStateDictAdapter.LoadModel(dir, ScalarType.Float32, CPU, withBias);
            for (int l = 0; l < config.Layers; l++)
                Assert.Equal(new[] { l, -l, 0.5, -0.25 }, D(loaded.Layers[l].Moe.ExpertBias!.BiasE));

            var e = Assert.Throws<UserError>(() => Moe.Runtime.Checkpoints.MixtralStateDictAdapter.LoadModel(dir, ScalarType.Float32, CPU));
            Assert.Contains("model.layers.0.block_sparse_moe.gate.e_score_correction_bias", e.Message);
            Assert.Contains("EnableExpertBias = true", e.Message);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void PadToCapacity_PadsToTheTokensWhenTheCapacityExceedsThem()
    {
        // T 2, top-1, E 2, factor 4: capacity ceil(2·1/2·4) = 4 > T. Megatron's capacity mask then selects
        // every token for every expert: each expert computes 2 rows, not 4.
        var hidden = torch.ones(2, 3);
        var routing = new Routing(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor(new float[] { 0.7f, 0.6f }).view(2, 1), torch.tensor(new long[] { 0, 0 }).view(2, 1));
        var d = LocalTokenDispatcher.Permute(hidden, routing, 2, new MoeOptions { TopK = 1, CapacityFactor = 4.0, PadToCapacity = true });
        Assert.Equal(new long[] { 2, 0 }, d.KeptPerExpertE.data<long>().ToArray());
        Assert.Equal(new long[] { 2, 2 }, d.RowsPerExpertE.data<long>().ToArray());
    }

    [Fact]
    public void PositionDrops_FollowMegatronsSequenceMajorTokenOrder()
    {
        // B 2 sequences of S 2, batch-major tokens t0 = (b0, s0), t1 = (b0, s1), t2 = (b1, s0), t3 = (b1, s1);
        // all pick expert 0, capacity ceil(4·1/2·1.0) = 2. Megatron's input is [S, B]: its order is
        // (s0, b0) = t0, (s0, b1) = t2, (s1, b0) = t1, (s1, b1) = t3, and the two earliest are t0 and t2.
        var hidden = torch.arange(4, dtype: ScalarType.Float32).view(4, 1);
        var routing = new Routing(torch.zeros(4, 2), torch.zeros(4, 2), torch.full(4, 1, 0.5f), torch.zeros(4, 1, dtype: ScalarType.Int64));
        var options = new MoeOptions { TopK = 1, CapacityFactor = 1.0, DropPolicy = DropPolicy.Position };
        var d = LocalTokenDispatcher.Permute(hidden, routing, 2, options, sequences: 2);
        Assert.Equal(new long[] { 0, 2 }, d.TokenOfRowR.data<long>().ToArray());
        // One sequence of four: the earliest are t0 and t1.
        Assert.Equal(new long[] { 0, 1 }, LocalTokenDispatcher.Permute(hidden, routing, 2, options, sequences: 1).TokenOfRowR.data<long>().ToArray());
        // The probs policy breaks ties between equal weights in the same order (torch.topk on CUDA keeps the
        // earlier row of Megatron's input): all four weigh 0.5, so again t0 and t2.
        var probs = LocalTokenDispatcher.Permute(hidden, routing, 2, options with { DropPolicy = DropPolicy.Probs }, sequences: 2);
        Assert.Equal(new long[] { 0, 2 }, probs.TokenOfRowR.data<long>().ToArray());
    }

    [Fact]
    public void InconsistentGroupSettings_AreRefusedWhenTheLayerIsBuilt()
    {
        var e = Assert.Throws<ArgumentException>(() => new MoeLayer(8, 4, 4, new MoeOptions { GroupTopK = 2 }, ScalarType.Float32, CPU));
        Assert.Contains("NumGroups", e.Message);
        Assert.Throws<ArgumentException>(() => new MoeLayer(8, 4, 4, new MoeOptions { NumGroups = 3, GroupTopK = 1 }, ScalarType.Float32, CPU));
        Assert.Throws<ArgumentException>(() => new MoeLayer(8, 4, 4, new MoeOptions { ExpertBias = true }, ScalarType.Float32, CPU));
    }

    [Fact]
    public void RecipeRouterSettings_ReachTheLayerOptions()
    {
        var s = new RecipeSettings
        {
            Router = new Router { ScoreFunction = ScoreFunction.Sigmoid, Dtype = RouterDtype.Fp64, NumGroups = 4, GroupTopK = 2, EnableExpertBias = true, BiasUpdateRate = 2e-3 },
        };
        var o = MoeOptions.From(s);
        Assert.Equal((RouterDtype?)RouterDtype.Fp64, o.RouterDtype);
        Assert.Equal((4, 2), (o.NumGroups!.Value, o.GroupTopK!.Value));
        Assert.True(o.ExpertBias);
        Assert.Equal(2e-3, o.BiasUpdateRate);
    }

    private sealed class ToleranceComparer(double tolerance) : IEqualityComparer<double>
    {
        public bool Equals(double x, double y) => Math.Abs(x - y) <= tolerance;

        public int GetHashCode(double obj) => 0;
    }
}
