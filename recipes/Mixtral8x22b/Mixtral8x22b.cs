using Moe.Dsl;

namespace Moe.Recipes;

/// <summary>
/// Supervised fine-tuning of Mixtral 8x22B on 32 GPUs: tensor parallel 2 with sequence parallel,
/// two pipeline stages, and the 8 experts of each layer spread over 8 expert-parallel ranks.
/// Data parallel (8) and expert data parallel (1) follow from the GPU count.
/// </summary>
[Recipe]
public sealed partial class Mixtral8x22b : Recipe
{
    public override Model Model => Model.Mixtral8x22B;

    public override Parallelism Parallelism => new()
    {
        Gpus = 32,
        Tensor = 2,
        Pipeline = 2,
        Expert = 8,
        SequenceParallel = true,
    };

    public override Router Router => new() { TopK = 2, AuxLossCoeff = 0.001, ZLossCoeff = 1e-3 };

    public override Capacity Capacity => new() { Factor = 1.25, DropPolicy = DropPolicy.Probs };

    public override Data Data => new()
    {
        Prefix = "data/sft_text_document",
        Split = "990,9,1",
        SequenceLength = 4096,
        ResetPositionIds = true,
        EodMaskLoss = true,
        Format = DataFormat.Sft,
    };

    public override Training Training => new()
    {
        GlobalBatchSize = 256,
        MicroBatchSize = 1,
        LearningRate = 1e-5,
        MinLearningRate = 1e-6,
        WarmupSteps = 100,
        Steps = 2000,
        Precision = Precision.Bf16,
    };

    public override Checkpoint Checkpoint => new() { Load = "checkpoints/Mixtral-8x22B-v0.1", Save = "checkpoints/mixtral8x22b-sft", Interval = 500 };
}
