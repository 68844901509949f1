using System.Text.Json;
using System.Text.Json.Nodes;
using Moe.Dsl.Layout;
using Moe.Runtime.Commands;
using Xunit;

namespace Moe.Dsl.Tests.Layout;

/// <summary>Our rank layout against Megatron-Core 0.20's own process groups (shared/vectors/megatron-ranks).</summary>
[Collection("Console")]
public class MegatronVectorTests
{
    public static TheoryData<string> VectorFiles()
    {
        var data = new TheoryData<string>();
        foreach (var f in Directory.GetFiles(Path.Combine(Moe.Tests.TestPaths.Shared, "vectors", "megatron-ranks"), "*.json").OrderBy(f => f, StringComparer.Ordinal))
            data.Add(Path.GetFileName(f));
        return data;
    }

    private static JsonObject Load(string file)
    {
        var node = JsonNode.Parse(File.ReadAllText(Path.Combine(Moe.Tests.TestPaths.Shared, "vectors", "megatron-ranks", file)))!.AsObject();
        node.Remove("source");
        return node;
    }

    private static RankLayout LayoutOf(JsonObject v) => new(
        (int)v["world"]!, (int)v["tp"]!, (int)v["pp"]!, (int)v["cp"]!, (int)v["ep"]!, (int)v["etp"]!,
        RankLayout.ParseOrder((string)v["order"]!)!.Value);

    [Fact]
    public void VectorsArePresent()
    {
        Assert.True(Directory.GetFiles(Path.Combine(Moe.Tests.TestPaths.Shared, "vectors", "megatron-ranks"), "*.json").Length >= 30, "expected the Megatron vector files beside the repository");
    }

    [Theory]
    [MemberData(nameof(VectorFiles))]
    public void LayoutJson_EqualsMegatronsGroups(string file)
    {
        var expected = Load(file);
        var actual = JsonNode.Parse(LayoutJson.Write(LayoutOf(expected)))!.AsObject();
        actual.Remove("source");
        foreach (var (key, value) in expected)
            Assert.True(JsonNode.DeepEquals(value, actual[key]), $"{file}: '{key}' differs");
        Assert.Equal(expected.Select(p => p.Key), actual.Select(p => p.Key));
    }

    [Theory]
    [InlineData("w32-tp1-pp4-cp1-ep8-etp1-tp-cp-ep-dp-pp.json")]
    [InlineData("w16-tp2-pp2-cp2-ep4-etp1-tp-cp-ep-dp-pp.json")]
    [InlineData("w128-tp2-pp1-cp1-ep4-etp2-tp-cp-ep-pp-dp.json")]
    public void LayoutVerb_Json_ReproducesTheVectorFile(string file)
    {
        Assert.True(File.Exists(Path.Combine(Moe.Tests.TestPaths.Shared, "vectors", "megatron-ranks", file)), $"{file} is missing from the shared Megatron vectors");
        var v = Load(file);
        var (exit, output, _) = Moe.Tests.ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(),
            ["layout", "--gpus", $"{v["world"]}", "--tp", $"{v["tp"]}", "--pp", $"{v["pp"]}", "--cp", $"{v["cp"]}",
             "--ep", $"{v["ep"]}", "--etp", $"{v["etp"]}", "--order", (string)v["order"]!, "--json"]));
        Assert.Equal(0, exit);
        var actual = JsonNode.Parse(output)!.AsObject();
        actual.Remove("source");
        Assert.True(JsonNode.DeepEquals(v, actual));
    }

    [Fact]
    public void LayoutVerb_IndivisibleLayout_ExitsTwoWithTheArithmetic()
    {
        var (exit, _, err) = Moe.Tests.ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(), ["layout", "--gpus", "24", "--tp", "2", "--ep", "8"]));
        Assert.Equal(2, exit);
        Assert.Contains("MOE0004", err);
        Assert.Contains("Gpus (24) must be a multiple of ExpertTensor × Expert × Pipeline = 2 × 8 × 1 = 16", err);
        Assert.DoesNotContain("   at ", err);
    }

    [Fact]
    public void LayoutVerb_PpDpOrderWithUnequalDataParallel_ExitsTwoWithTheArithmetic()
    {
        // W 16, TP 2, PP 2, EP 4, ETP 1 under tp-cp-ep-pp-dp: DP = 16/(2·1·2) = 4 but EDP = 16/(1·4·2) = 2 (R005).
        var (exit, _, err) = Moe.Tests.ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(),
            ["layout", "--gpus", "16", "--tp", "2", "--pp", "2", "--ep", "4", "--etp", "1", "--order", "tp-cp-ep-pp-dp"]));
        Assert.Equal(2, exit);
        Assert.Contains("MOE0005", err);
        Assert.Contains("16 / (1·4·2) = 2", err);
        Assert.Contains("16 / (2·1·2) = 4", err);
        Assert.Contains("TpCpEpDpPp", err);
        Assert.DoesNotContain("   at ", err);
    }

    [Fact]
    public void LayoutVerb_NegativeSize_ExitsTwo()
    {
        var (exit, _, err) = Moe.Tests.ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(), ["layout", "--gpus", "8", "--pp", "-1"]));
        Assert.Equal(2, exit);
        Assert.Contains("Pipeline (-1) must be at least 1", err);
    }

    [Fact]
    public void LayoutVerb_Table_ListsGroupsAndCoordinates()
    {
        var (exit, output, _) = Moe.Tests.ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(), ["layout", "--gpus", "16", "--tp", "2", "--pp", "2", "--cp", "2", "--ep", "4", "--etp", "1"]));
        Assert.Equal(0, exit);
        Assert.Contains("dp 2, edp 2, order tp-cp-ep-dp-pp", output);
        Assert.Contains("dp_cp               4 × 4: [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]", output);
    }

    [Fact]
    public void LayoutVerb_Table_HugeLayout_IsSummarised()
    {
        // W 131,072, TP 8, PP 16, EP 8 (ETP 8): DP 1024, EDP 128; dense strides tp 1, dp 8, pp 8·1024; expert edp 8·8.
        var (exit, output, _) = Moe.Tests.ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(), ["layout", "--gpus", "131072", "--tp", "8", "--pp", "16", "--ep", "8"]));
        Assert.Equal(0, exit);
        Assert.Contains("dense grid   tp 8 (stride 1), cp 1 (stride 8), ep 1 (stride 8), dp 1024 (stride 8), pp 16 (stride 8192)\n", output);
        Assert.Contains("expert grid  tp 8 (stride 1), cp 1 (stride 8), ep 8 (stride 8), dp 128 (stride 64), pp 16 (stride 8192)\n", output);
        Assert.Contains("  tp                  16384 × 8: [0,1,2,3,4,5,6,7] [8,9,10,11,12,13,14,15] [16,17,18,19,20,21,22,23] … (16380 more) [131064,131065,131066,131067,131068,131069,131070,131071]\n", output);
        Assert.Contains("  pp                  8192 × 16: [0,8192,16384,24576,32768,40960,49152,57344,65536,73728,81920,90112,98304,106496,114688,122880] ", output);
        Assert.Contains("  intra_dist_opt      1 × 131072: [0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,…,131071]\n", output);
        Assert.Contains("\n  rank   tp  cp  dp  pp  dp_cp  ep  etp  edp\n", output);
        Assert.Contains("\n131071    7   0 1023  15   1023   7    7  127\n", output);
        Assert.Contains("  for each i in 0..127: DATA_PARALLEL_GROUP (nccl) dp[i], DATA_PARALLEL_GROUP_GLOO (gloo) dp[i]\n", output);
        Assert.Contains("  for each i in 0..8191: PIPELINE_MODEL_PARALLEL_GROUP (nccl) pp[i], EMBEDDING_GROUP (nccl) embedding[i], POSITION_EMBEDDING_GROUP (nccl) position_embedding[i]\n", output);
        Assert.Contains("  GTP_WEIGHT_REMAT_GROUP (nccl) gtp_remat[0..131071]\n", output);
        Assert.InRange(output.Split('\n').Length, 40, 80);
    }
}
