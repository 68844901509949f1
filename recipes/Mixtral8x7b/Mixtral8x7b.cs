using Moe.Dsl;

namespace Moe.Recipes;

/// <summary>
/// Supervised fine-tuning of Mixtral 8x7B on 32 GPUs (four 8-GPU nodes): each node's 8 GPUs hold
/// the 8 experts of every layer (expert parallel 8 stays on NVLink), no tensor or pipeline split.
/// Data parallel is 32 and expert data parallel 4.
/// </summary>
[Recipe]
public sealed partial class Mixtral8x7b : Recipe
{
    public override Model Model => Model.Mixtral8x7B;

    public override Parallelism Parallelism => new()
    {
        Gpus = 32,
        Tensor = 1,
        Pipeline = 1,
        Expert = 8,
    };

    public override Router Router => new() { TopK = 2, AuxLossCoeff = 0.02 };

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
        GlobalBatchSize = 128,
        MicroBatchSize = 1,
        LearningRate = 2e-5,
        MinLearningRate = 2e-6,
        WarmupSteps = 50,
        Steps = 1000,
        Precision = Precision.Bf16,
    };

    public override Checkpoint Checkpoint => new() { Load = "checkpoints/Mixtral-8x7B-v0.1", Save = "checkpoints/mixtral8x7b-sft", Interval = 250 };
}
