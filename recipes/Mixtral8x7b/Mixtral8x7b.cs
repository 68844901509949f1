using Moe.Dsl;

namespace Moe.Recipes;

/// <summary>
/// Supervised fine-tuning of Mixtral 8x7B on 32 H100s (four 8-GPU nodes) in the layout Megatron-LM's
/// Mixtral example recommends for training, TP1 EP8 PP4: no tensor split, four pipeline stages of 8 layers,
/// and the 8 experts of each layer on the 8 GPUs of a node (expert parallel stays on NVLink).
/// Data parallel is 8 and expert data parallel 1; Megatron's distributed optimizer
/// (<c>--use-distributed-optimizer</c>, which the memory estimate assumes) shards the dense optimizer state 8 ways.
/// The plan estimates about 65 GB on the most loaded GPU (first stage: 4 micro-batches in flight), so it fits
/// an H100's 80 GB; the one-stage layout (TP1 PP1 EP8) needs about 97 GB and does not.
/// </summary>
[Recipe]
public sealed partial class Mixtral8x7b : Recipe
{
    public override Model Model => Model.Mixtral8x7B;

    public override Parallelism Parallelism => new()
    {
        Gpus = 32,
        Gpu = Gpu.H100,
        Tensor = 1,
        Pipeline = 4,
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
