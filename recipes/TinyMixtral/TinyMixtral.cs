using Moe.Dsl;

namespace Moe.Recipes;

/// <summary>
/// A tiny Mixtral (4 layers, 4 experts, top-2, GQA) trained from scratch on the small dataset shipped
/// in data/, on one CPU or GPU. It exercises every part of the runtime in minutes.
/// </summary>
[Recipe]
public sealed partial class TinyMixtral : Recipe
{
    public override Model Model => Model.TinyMixtral;

    public override Parallelism Parallelism => new() { Gpus = 1 };

    public override Data Data => new()
    {
        Prefix = "data/tiny_text_document",
        Tokenizer = "data/tokenizer.model",
        Split = "98,2,0",
        SequenceLength = 128,
        ResetPositionIds = true,
        ResetAttentionMask = true,
        EodMaskLoss = true,
    };

    public override Training Training => new()
    {
        GlobalBatchSize = 8,
        MicroBatchSize = 8,
        LearningRate = 3e-3,
        MinLearningRate = 3e-4,
        WarmupSteps = 10,
        Steps = 60,
        EvalInterval = 20,    // validation loss at steps 20, 40, 60 on 2 global batches of the 2 % validation split
        EvalIters = 2,
        WeightDecay = 0.01,
        Precision = Precision.Bf16, // bf16 with fp32 master weights on a GPU; the CPU trains in fp32
        Seed = 1234,
    };
}
