using Moe.Dsl;

namespace Moe.Bench;

/// <summary>
/// Two layers of Mixtral 8x7B (hidden 4096, 32/8 heads, 8 experts of width 14,336, top-2, vocabulary 32,000) on
/// TinyMixtral's shipped data, for the GPU checks: `train --gpus 2` against one GPU in fp32 (`--precision fp32`)
/// under each launcher, and bf16 training with expert parallelism (`--ep 2`). Not a production recipe.
/// </summary>
[Recipe]
public sealed partial class MixtralShaped : Recipe
{
    public override Model Model => Model.Mixtral8x7B with { Layers = 2 };

    public override Parallelism Parallelism => new() { Gpus = 1, Gpu = Gpu.H200 };

    public override Data Data => new()
    {
        Prefix = "data/tiny_text_document",
        Tokenizer = "data/tokenizer.model",
        Split = "98,2,0",
        SequenceLength = 1024,
        ResetPositionIds = true,
        ResetAttentionMask = true,
        EodMaskLoss = true,
    };

    public override Training Training => new()
    {
        GlobalBatchSize = 8,
        MicroBatchSize = 1,
        LearningRate = 1e-4,
        MinLearningRate = 1e-5,
        WarmupSteps = 2,
        Steps = 5,
        EvalInterval = null,
        Seed = 1234,
    };
}
