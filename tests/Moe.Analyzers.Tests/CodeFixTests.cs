using Xunit;

namespace Moe.Analyzers.Tests;

/// <summary>Before and after for the fixes the rule set attaches to its findings.</summary>
public class CodeFixTests
{
    [Fact]
    public async Task ExpertNotDividing_IsSetToTheNearestDivisor()
    {
        await Verify.CodeFix<TopologyAnalyzer>("""
            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x22B;
                public override Parallelism Parallelism => new() { Gpus = 48, Tensor = 2, Pipeline = 2, {|#0:Expert = 6|}, SequenceParallel = true };
            }
            """, """
            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x22B;
                public override Parallelism Parallelism => new() { Gpus = 48, Tensor = 2, Pipeline = 2, Expert = 4, SequenceParallel = true };
            }
            """, [Verify.Diagnostic("MOE0003").WithLocation(0).WithMessage("Expert (6) must divide the 8 experts of Mixtral 8x22B; valid: 1, 2, 4, 8")], iterations: 1);
    }

    [Fact]
    public async Task SequenceParallelWithoutTensor_IsRemoved()
    {
        await Verify.CodeFix<TopologyAnalyzer>("""
            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => new() { Gpus = 8, Expert = 8, {|#0:SequenceParallel = true|} };
            }
            """, """
            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => new() { Gpus = 8, Expert = 8 };
            }
            """, [Verify.Diagnostic("MOE0009").WithLocation(0).WithMessage("SequenceParallel = true needs Tensor > 1 (sequence parallel splits the sequence over the tensor-parallel group, and Tensor is 1); remove SequenceParallel or raise Tensor")]);
    }

    [Fact]
    public async Task TensorParallelMoeWithoutSequenceParallel_GetsItAdded()
    {
        await Verify.CodeFix<TopologyAnalyzer>("""
            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => {|#0:new() { Gpus = 16, Tensor = 2, Expert = 8 }|};
            }
            """, """
            [Recipe]
            public sealed partial class R : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Parallelism Parallelism => new() { Gpus = 16, Tensor = 2, Expert = 8, SequenceParallel = true };
            }
            """, [Verify.Diagnostic("MOE0010").WithLocation(0).WithMessage("Tensor (2) > 1 in an MoE model needs SequenceParallel = true (Megatron's MoE layer raises at the first training step otherwise)")]);
    }

    [Fact]
    public async Task FixAll_FixesEveryRecipeInTheDocument()
    {
        await Verify.CodeFix<RouterAndCapacityAnalyzer>("""
            [Recipe]
            public sealed partial class A : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Router Router => new() { {|#0:TopK = 9|} };
            }

            [Recipe]
            public sealed partial class B : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Router Router => new() { {|#1:TopK = 12|} };
            }
            """, """
            [Recipe]
            public sealed partial class A : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Router Router => new() { TopK = 8 };
            }

            [Recipe]
            public sealed partial class B : Recipe
            {
                public override Model Model => Model.Mixtral8x7B;
                public override Router Router => new() { TopK = 8 };
            }
            """, [Verify.Diagnostic("MOE0101").WithLocation(0).WithMessage("TopK (9) must be between 1 and the 8 experts of Mixtral 8x7B"),
                  Verify.Diagnostic("MOE0101").WithLocation(1).WithMessage("TopK (12) must be between 1 and the 8 experts of Mixtral 8x7B")]);
    }
}
