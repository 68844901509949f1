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
        Assert.Contains("data parallel             8 = 32 / (2·2·1)", output);
        Assert.Contains("expert data parallel      1 = 32 / (2·8·2)", output);
        Assert.Contains("stage 1                   layers 28–55 (28)", output);
        Assert.Contains("ep rank 7                 expert 7", output);
        Assert.Contains("gradient accumulation     32 = 256 / (1·8)", output);
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
        Assert.Contains("WILL NOT FIT", output);
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
            "--micro-batch-size", "--global-batch-size", "--steps", "--lr", "--seq-length", "--data-path", "--load", "--save", "--save-interval", "--keep-last", "--seed",
        }, names);
    }
}
