using Moe.Dsl;
using Moe.Runtime.Commands;
using Xunit;

namespace Moe.Dsl.Tests.Cli;

/// <summary>The plan verb as a user runs it: through the command tree, with exit codes and output.</summary>
[Collection("Console")]
public class PlanCommandTests
{
    private static (int Exit, string Out, string Err) Run(RecipeSettings? recipe, params string[] args) =>
        Moe.Tests.ConsoleCapture.Run(() => MoeCommands.Run(recipe is null ? MoeCommands.CreateRoot() : MoeCommands.CreateRoot(recipe), args));

    private static RecipeSettings X22 => new Moe.Recipes.Mixtral8x22b().ToSettings();

    [Fact]
    public void RecipeWithNoVerb_PrintsThePlan()
    {
        var (exit, output, _) = Run(X22);
        Assert.Equal(0, exit);
        Assert.StartsWith("Plan for Mixtral8x22b: Mixtral 8x22B, 140,630,071,296 parameters", output);
        Assert.Contains("GPUs                      32 × H200 (141 GB)", output);
        Assert.Contains("of H200's 141 GB: fits", output);
        Assert.DoesNotContain("MOE0301", output);
        Assert.Contains("data parallel             8 = 32 / (2·2·1)", output);
        Assert.Contains("expert data parallel      1 = 32 / (2·8·2)", output);
        Assert.Contains("stage 1                   layers 28–55 (28)", output);
        Assert.Contains("ep rank 7                 expert 7", output);
        Assert.Contains("gradient accumulation     32 = 256 / (1·8)", output);
        Assert.Contains("drop rate at most         1 % (mean of 20 steps)", output);
        Assert.Contains("stops on                  nothing (warnings only)", output);
    }

    [Fact]
    public void OverrideThatBreaksTheLayout_ExitsTwoWithEveryFinding()
    {
        var (exit, _, err) = Run(X22, "--ep", "16");
        Assert.Equal(2, exit);
        Assert.Contains("MOE0003 [Parallelism.Expert]: Expert (16) must divide the 8 experts of Mixtral 8x22B; valid: 1, 2, 4, 8", err);
        Assert.Contains("MOE0004", err);
        Assert.DoesNotContain("   at ", err); // no stack trace
    }

    [Fact]
    public void NegativeSize_ExitsTwoWithTheRule()
    {
        var (exit, _, err) = Run(null, "plan", "--model", "8x7b", "--gpus", "8", "--tp", "-2");
        Assert.Equal(2, exit);
        Assert.Contains("MOE0001 [Parallelism.Tensor]: Tensor (-2) must be at least 1", err);
    }

    [Fact]
    public void ToolPlan_OnAPreset_MarksALayoutThatWillNotFit()
    {
        // 8x22B on 8 GPUs with EP 8 keeps all 56 layers' attention and one expert per layer on each GPU.
        var (exit, output, _) = Run(null, "plan", "--model", "8x22b", "--gpus", "8", "--ep", "8", "--global-batch-size", "8", "--gpu", "h100");
        Assert.Equal(0, exit);
        Assert.StartsWith("  warning MOE0301 [Parallelism.Gpu]: The plan needs about ", output);
        Assert.Contains("Plan for Mixtral 8x22B, 140,630,071,296 parameters", output);
        Assert.DoesNotContain("moe plan", output);
        Assert.Contains("WILL NOT FIT (MOE0301)", output);
    }

    [Fact]
    public void RecipeOnASmallerGpu_WarnsThatThePlanDoesNotFit()
    {
        var (exit, output, _) = Run(X22, "--gpu", "h100");
        Assert.Equal(0, exit);
        Assert.Contains("warning MOE0301 [Parallelism.Gpu]", output);
        Assert.Contains("more than the H100's 80 GB. It fits on H200, B200 (Gpu = Gpu.H200)", output);
    }

    [Fact]
    public void ParseError_PrintsTheErrorAndOneHint_NotTheHelp()
    {
        var (exit, output, err) = Run(null, "plan", "--modle", "8x7b");
        Assert.Equal(2, exit);
        Assert.Equal("", output);
        var lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Contains("error: Unrecognized command or argument '--modle'.", lines[0]);
        // "Run 'moe plan --help' …"; the root command is named after the process (here the test host).
        Assert.Matches(@"^Run '\S+ plan --help' for the options\.$", lines[^1].TrimEnd('\r'));
        Assert.All(lines[..^1], line => Assert.StartsWith("error: ", line)); // '--modle' and the '8x7b' after it
        Assert.DoesNotContain("Options:", err);
        Assert.DoesNotContain("--micro-batch-size", err);
    }

    [Fact]
    public void LayoutJson_IsIndented_AndParsesToTheCompactForm()
    {
        var (exit, output, _) = Run(null, "layout", "--gpus", "8", "--tp", "2", "--ep", "4", "--json");
        Assert.Equal(0, exit);
        Assert.StartsWith("{\n  \"source\": ", output);
        Assert.Contains("\n  \"world\": 8,\n", output);
        Assert.Contains("\n      [0, 1],\n", output); // one tp group per line
        var compact = Moe.Dsl.Layout.LayoutJson.Write(new Moe.Dsl.Layout.RankLayout(8, 2, 1, 1, 4, 2, Moe.Dsl.Layout.RankOrder.TpCpEpDpPp));
        Assert.True(System.Text.Json.Nodes.JsonNode.DeepEquals(System.Text.Json.Nodes.JsonNode.Parse(compact), System.Text.Json.Nodes.JsonNode.Parse(output)));
    }

    [Fact]
    public void ToolPlan_TinyModelOnOneGpu_Fits()
    {
        var (exit, output, _) = Run(null, "plan", "--model", "tiny", "--gpus", "1", "--seq-length", "128");
        Assert.Equal(0, exit);
        Assert.Contains("of H100's 80 GB: fits", output);
    }

    [Fact]
    public void OverrideOptionSet_IsFrozen()
    {
        // Adding a command-line override is a deliberate change: update this list and the README together.
        var names = new RecipeOptions(X22).All.Select(o => o.Name).ToArray();
        Assert.Equal(new[]
        {
            "--gpus", "--tp", "--pp", "--cp", "--ep", "--etp", "--sequence-parallel", "--order",
            "--micro-batch-size", "--global-batch-size", "--steps", "--warmup-steps", "--eval-interval", "--lr", "--seq-length", "--data-path", "--load", "--save", "--save-interval", "--keep-last", "--seed", "--precision", "--overlap-grad-reduce", "--recompute-granularity", "--recompute-method", "--recompute-num-layers", "--recompute-modules",
        }, names);
    }
}
