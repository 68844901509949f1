using Moe.Dsl;

namespace Moe.Recipes;

/// <summary>
/// Supervised fine-tuning of Mixtral 8x22B on 32 H200s: tensor parallel 2 with sequence parallel,
/// two pipeline stages, and the 8 experts of each layer spread over 8 expert-parallel ranks.
/// Data parallel (8) and expert data parallel (1) follow from the GPU count.
/// Why H200: full fine-tuning with Adam in bf16 holds 18 bytes per parameter (bf16 weights 2, fp32 gradients 4,
/// fp32 master weights 4, Adam moments 8), so 8x22B's 141 B parameters need 2.5 TB before activations,
/// and no layout of 32 H100s (2.56 TB) holds that with activations: with Megatron's distributed optimizer
/// (<c>--use-distributed-optimizer</c>, which the memory estimate assumes) the expert state alone is at least
/// 18 × 135 B / 32 = 76 GB per GPU. On H200s the plan estimates about 113 GB on the most loaded GPU.
/// </summary>
[Recipe]
public sealed partial class Mixtral8x22b : Recipe
{
    public override Model Model => Model.Mixtral8x22B;

    public override Parallelism Parallelism => new()
    {
        Gpus = 32,
        Gpu = Gpu.H200,
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
