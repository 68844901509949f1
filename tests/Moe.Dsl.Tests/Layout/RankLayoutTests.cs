using Moe.Dsl.Layout;
using Moe.Tests;
using Xunit;

namespace Moe.Dsl.Tests.Layout;

/// <summary>
/// <see cref="RankLayout"/> through <see cref="IRankLayout"/>: every lookup against Megatron's own vectors, and a
/// 131,072-rank layout against hand arithmetic on the strides (spec §2.1: dense rank = tp + TP·(cp + CP·(dp + DP·pp))).
/// </summary>
public class RankLayoutTests
{
    public static TheoryData<string> VectorFiles() => new(MegatronVectors.Files());

    private static RankLayout Like(IRankLayout v) => new(v.World, v.Tensor, v.Pipeline, v.Context, v.Expert, v.ExpertTensor, v.Order);

    [Theory]
    [MemberData(nameof(VectorFiles))]
    public void EveryLookup_EqualsMegatronsVector(string file)
    {
        var megatron = MegatronVectors.Load(file);
        Assert.Empty(LayoutEquality.Differences(megatron, Like(megatron)));
    }

    [Fact]
    public void VectorsCoverBothOrdersAndEmbeddingGaps()
    {
        // The theory above proves little unless the set has PP > 2 (ranks in no embedding group) and both orders.
        var all = MegatronVectors.Files().Select(MegatronVectors.Load).ToArray();
        Assert.Contains(all, v => v.Pipeline > 2 && Enumerable.Range(0, v.World).Any(r => v.GroupIndexOf("embedding", r) == -1));
        Assert.Contains(all, v => v.Order == RankOrder.TpCpEpPpDp && v.Pipeline > 1);
        Assert.Contains(all, v => v.ExpertTensor != v.Tensor);
    }

    /// <summary>W 131,072, TP 8, PP 16, EP 8 (ETP 8), CP 1, default order: DP 1024, EDP 128; dense strides tp 1, dp 8, pp 8192; expert strides etp 1, ep 8, edp 64, pp 8192.</summary>
    private static readonly RankLayout Huge = new(131072, 8, 16, 1, 8, 8, RankOrder.TpCpEpDpPp);

    [Fact]
    public void HugeLayout_CoordinatesFollowTheStrides()
    {
        Assert.Equal((1024, 128), (Huge.DataParallel, Huge.ExpertDataParallel));
        // 131071 = 7 + 8·(1023 + 1024·15); expert: 7 + 8·(7 + 8·(127 + 128·15)).
        Assert.Equal(new RankCoordinates(Tp: 7, Cp: 0, Dp: 1023, Pp: 15, DpCp: 1023, Ep: 7, Etp: 7, Edp: 127), Huge.Coordinates(131071));
        // 8197 = 5 + 8·1024·1: tp 5, dp 0, stage 1; expert 5 + 8·(0 + 8·(0 + 128·1)).
        Assert.Equal(new RankCoordinates(5, 0, 0, 1, 0, 0, 5, 0), Huge.Coordinates(8197));
    }

    [Fact]
    public void HugeLayout_GroupsFollowTheStrides()
    {
        Assert.Equal(131072 / 8, Huge.GroupCount("tp"));
        Assert.Equal(131072 / 1024, Huge.GroupCount("dp"));
        Assert.Equal(131072 / 16, Huge.GroupCount("pp"));
        Assert.Equal(131072 / 128, Huge.GroupCount("expert_dp"));
        Assert.Equal(1, Huge.GroupCount("intra_dist_opt"));
        Assert.Equal(131072, Huge.GroupCount("gtp_remat"));

        // dp groups are numbered over (tp, pp): rank 131071 has tp 7, pp 15 → 7 + 8·15 = 127; members step 8 from 7 + 15·8192.
        Assert.Equal(127, Huge.GroupIndexOf("dp", 131071));
        Assert.Equal(Enumerable.Range(0, 1024).Select(k => 122887 + 8 * k), Huge.Group("dp", 127));
        Assert.Equal(Huge.Group("dp", 127), Huge.GroupOf("dp", 131071));
        // ep groups are numbered over (etp, edp, pp): 7 + 8·127 + 1024·15 = 16383; base 7 + 64·127 + 8192·15 = 131015.
        Assert.Equal(16383, Huge.GroupIndexOf("ep", 131071));
        Assert.Equal(Enumerable.Range(0, 8).Select(k => 131015 + 8 * k), Huge.GroupOf("ep", 131071));
        // tp_ep_pp varies along etp, ep and pp: group 0 is 0..63 then 8192..8255, …; intra_dist_opt concatenates the 128 of them.
        Assert.Equal(Enumerable.Range(0, 16).SelectMany(pp => Enumerable.Range(8192 * pp, 64)), Huge.Group("tp_ep_pp", 0));
        var intra = Huge.Group("intra_dist_opt", 0);
        Assert.Equal(131072, intra.Length);
        Assert.Equal(Huge.Group("tp_ep_pp", 1), intra.Skip(1024).Take(1024));
        Assert.Equal(131072, intra.Distinct().Count());
    }

    [Fact]
    public void HugeLayout_EmbeddingHoldsOnlyFirstAndLastStages()
    {
        // Pipeline group 5 is rank 5 at each stage (stride 8192): embedding [5, 5 + 15·8192], position embedding [5].
        Assert.Equal(new[] { 5, 122885 }, Huge.Group("embedding", 5));
        Assert.Equal(new[] { 5 }, Huge.Group("position_embedding", 5));
        Assert.Equal(5, Huge.GroupIndexOf("embedding", 122885));
        Assert.Equal(-1, Huge.GroupIndexOf("position_embedding", 122885));
        Assert.Equal(-1, Huge.GroupIndexOf("embedding", 7 * 8192));
        Assert.Empty(Huge.GroupOf("embedding", 7 * 8192));
    }

    [Fact]
    public void HugeLayout_CreationOrderIsIndexedWithoutListing()
    {
        // 1 gtp + 2·128 dp-cp + 2·128 dp + cp, mp, tp + 3·8192 pipeline loop + 3 tp-dp-cp/tp-dp/tp-cp
        // + 6 expert runs (egtp, ep, etp, tp-ep, tp-ep-pp twice) + 2·1024 expert dp + intra_dist_opt.
        var runs = Huge.CreationOrder;
        Assert.Equal(1 + 256 + 256 + 3 + 3 * 8192 + 3 + 6 + 2 * 1024 + 1, runs.Count);
        Assert.Equal(new GroupCreation("GTP_WEIGHT_REMAT_GROUP", "nccl", "gtp_remat", 0, 131072), runs[0]);
        Assert.Equal(new GroupCreation("DATA_PARALLEL_GROUP_GLOO", "gloo", "dp", 127, 1), runs[512]);
        Assert.Equal(new GroupCreation("CONTEXT_PARALLEL_GROUP", "nccl", "cp", 0, 131072), runs[513]);
        Assert.Equal(new GroupCreation("EMBEDDING_GROUP", "nccl", "embedding", 8191, 1), runs[516 + 3 * 8191 + 1]);
        Assert.Equal(new GroupCreation("INTRA_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP", "nccl", "intra_dist_opt", 0, 1), runs[runs.Count - 1]);
        Assert.Equal(runs.Count, runs.Count());
    }

    [Fact]
    public void BadLookups_ThrowNamingTheValidRange()
    {
        var e = Assert.Throws<ArgumentException>(() => Huge.GroupCount("expert_pp"));
        Assert.Contains("tp, cp, dp, dp_cp, pp", e.Message);
        Assert.Contains("131071", Assert.Throws<ArgumentOutOfRangeException>(() => Huge.Coordinates(131072)).Message);
        Assert.Contains("8192 groups", Assert.Throws<ArgumentOutOfRangeException>(() => Huge.Group("pp", 8192)).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => Huge.GroupIndexOf("tp", -1));
    }

    [Fact]
    public void FromGrids_TheLayoutsOwnGrids_GiveTheSameLayout()
    {
        // W 64, TP 2, PP 4, CP 2, EP 4, ETP 1 under tp-cp-ep-pp-dp: DP = 64/16 = 4 = EDP = 64/(1·4·4) (R005).
        var layout = new RankLayout(64, 2, 4, 2, 4, 1, RankOrder.TpCpEpPpDp);
        Assert.Equal("tp 2 (stride 1), cp 2 (stride 2), ep 1 (stride 4), pp 4 (stride 4), dp 4 (stride 16)", layout.DenseGrid.ToString());
        Assert.Equal("tp 1 (stride 1), cp 1 (stride 1), ep 4 (stride 1), pp 4 (stride 4), dp 4 (stride 16)", layout.ExpertGrid.ToString());
        Assert.Empty(LayoutEquality.Differences(layout, RankLayout.FromGrids(layout.DenseGrid, layout.ExpertGrid)));
    }

    [Fact]
    public void Grids_ThatAreNotMegatronsPair_AreRefused()
    {
        var stride = Assert.Throws<ArgumentException>(() => new RankGrid(new GridAxis("tp", 2, 1), new GridAxis("cp", 1, 2), new GridAxis("ep", 1, 2), new GridAxis("dp", 4, 4), new GridAxis("pp", 2, 8)));
        Assert.Contains("Axis dp has stride 4, but the product of the sizes of the axes before it is 2", stride.Message);
        Assert.Throws<ArgumentException>(() => new RankGrid(new GridAxis("cp", 1, 1), new GridAxis("tp", 2, 1), new GridAxis("ep", 1, 2), new GridAxis("dp", 4, 2), new GridAxis("pp", 2, 8)));
        var dense = RankGrid.Of(RankOrder.TpCpEpDpPp, tp: 2, cp: 1, ep: 1, dp: 4, pp: 2);
        var pipeline = Assert.Throws<ArgumentException>(() => RankLayout.FromGrids(dense, RankGrid.Of(RankOrder.TpCpEpDpPp, tp: 1, cp: 1, ep: 2, dp: 2, pp: 4)));
        Assert.Contains("pp 2 and the expert grid pp 4", pipeline.Message);
        Assert.Contains("ep axis has size 2", Assert.Throws<ArgumentException>(() => RankLayout.FromGrids(RankGrid.Of(RankOrder.TpCpEpDpPp, 2, 1, 2, 2, 2), RankGrid.Of(RankOrder.TpCpEpDpPp, 2, 1, 2, 2, 2))).Message);
        Assert.Contains("one order for both", Assert.Throws<ArgumentException>(() => RankLayout.FromGrids(dense, RankGrid.Of(RankOrder.TpCpEpPpDp, 2, 1, 1, 4, 2))).Message);
    }

    [Fact]
    public void Tabulated_TablesThatAreNotWhole_AreRefused()
    {
        var layout = new RankLayout(8, 2, 1, 1, 2, 1, RankOrder.TpCpEpDpPp);
        var families = RankLayout.FamilyKeys.Select(k => (k, Enumerable.Range(0, layout.GroupCount(k)).Select(g => layout.Group(k, g)).ToArray())).ToArray();
        var coordinates = Enumerable.Range(0, 8).Select(layout.Coordinates).ToArray();
        TabulatedRankLayout Make((string, int[][])[] f) => new(8, 2, 1, 1, 2, 1, RankOrder.TpCpEpDpPp, f, coordinates, layout.CreationOrder.ToArray());

        Assert.Empty(LayoutEquality.Differences(layout, Make(families)));
        var twice = families.Select(f => f.Item1 == "tp" ? (f.Item1, new[] { new[] { 0, 1 }, new[] { 1, 2 }, new[] { 4, 5 }, new[] { 6, 7 } }) : f).ToArray();
        Assert.Contains("Family tp: rank 1 is in group 0 and in group 1", Assert.Throws<ArgumentException>(() => Make(twice)).Message);
        Assert.Contains("Families missing: ep", Assert.Throws<ArgumentException>(() => Make(families.Where(f => f.Item1 != "ep").ToArray())).Message);
        Assert.Contains("rank 8 is not in 0..7", Assert.Throws<ArgumentException>(() => Make(families.Select(f => f.Item1 == "gtp_remat" ? (f.Item1, f.Item2.Append(new[] { 8 }).ToArray()) : f).ToArray())).Message);
    }

    [Fact]
    public void Differences_NameWhatDiffers()
    {
        var megatron = MegatronVectors.Load("w16-tp4-pp2-cp1-ep4-etp1-tp-cp-ep-pp-dp.json");
        var otherOrder = new RankLayout(16, 4, 2, 1, 4, 1, RankOrder.TpCpEpDpPp);
        var found = LayoutEquality.Differences(megatron, otherOrder, limit: 5);
        Assert.Equal("Order: expected TpCpEpPpDp, actual TpCpEpDpPp", found[0]);
        Assert.Equal(5, found.Count);
        // TP 4, DP 2, PP 2: under tp-cp-ep-pp-dp the dp stride is 4·2 = 8, under tp-cp-ep-dp-pp it is 4.
        Assert.Equal("dp[0]: expected [0,8], actual [0,4]", found[1]);
    }

    [Fact]
    public void LayoutSource_UsesTheWiringOnlyForItsOwnTopology()
    {
        var settings = new RecipeSettings { Parallelism = new Parallelism { Gpus = 16, Tensor = 2, Pipeline = 2, Expert = 4 } };
        var wiring = new RankLayout(16, 2, 2, 1, 4, 2, RankOrder.TpCpEpDpPp);
        // ExpertTensor unset means ETP = TP, so the wiring with ETP 2 is the settings' layout.
        Assert.Same(wiring, LayoutSource.For(settings, wiring));
        var etp1 = settings with { Parallelism = settings.Parallelism with { ExpertTensor = 1 } };
        var computed = LayoutSource.For(etp1, wiring);
        Assert.NotSame(wiring, computed);
        Assert.Equal((16, 1, 2), (computed.World, computed.ExpertTensor, computed.ExpertDataParallel));
        Assert.IsType<RankLayout>(LayoutSource.For(settings, null));
        // Only the order differs (EP 2, ETP 1 keep EDP = DP = 4 as tp-cp-ep-pp-dp needs).
        var ep2 = settings with { Parallelism = settings.Parallelism with { Expert = 2, ExpertTensor = 1 } };
        var ep2Wiring = new RankLayout(16, 2, 2, 1, 2, 1, RankOrder.TpCpEpDpPp);
        Assert.Same(ep2Wiring, LayoutSource.For(ep2, ep2Wiring));
        var reordered = LayoutSource.For(ep2 with { Parallelism = ep2.Parallelism with { Order = RankOrder.TpCpEpPpDp } }, ep2Wiring);
        Assert.Equal(RankOrder.TpCpEpPpDp, reordered.Order);
    }
}
