using Moe.Dsl;

namespace Recipes;

//#if (model == "8x22b")
/// <summary>
/// Supervised fine-tuning of Mixtral 8x22B on H200s: tensor parallel 2 with sequence parallel, two pipeline
/// stages, the 8 experts of each layer on 8 expert-parallel ranks. 8x22B's model state alone is about 2.5 TB
/// (18 bytes per parameter with Adam), which 32 H100s cannot hold; 32 H200s can (rule MOE0301 checks).
/// </summary>
//#elseif (model == "tiny")
/// <summary>
/// A tiny Mixtral (4 layers, 4 experts, top-2) trained from scratch: it runs on a CPU in seconds.
/// </summary>
//#else
/// <summary>
/// Supervised fine-tuning of Mixtral 8x7B in the layout Megatron-LM's Mixtral example recommends for training
/// (TP1 EP8 PP4): four pipeline stages of 8 layers, the 8 experts of each layer on the 8 GPUs of a node.
/// </summary>
//#endif
[Recipe]
public sealed partial class MoeRecipe : Recipe
{
//#if (model == "8x22b")
    public override Model Model => Model.Mixtral8x22B;

    public override Parallelism Parallelism => new()
    {
        Gpus = GPU_COUNT,
        Gpu = Gpu.H200,
        Tensor = 2,
        Pipeline = 2,
        Expert = 8,
        SequenceParallel = true,
    };

    public override Router Router => new() { TopK = 2, AuxLossCoeff = 0.001, ZLossCoeff = 1e-3 };
//#elseif (model == "tiny")
    public override Model Model => Model.TinyMixtral;

    public override Parallelism Parallelism => new() { Gpus = GPU_COUNT };
//#else
    public override Model Model => Model.Mixtral8x7B;

    public override Parallelism Parallelism => new()
    {
        Gpus = GPU_COUNT,
        Gpu = Gpu.H100,
        Tensor = 1,
        Pipeline = 4,
        Expert = 8,
    };

    public override Router Router => new() { TopK = 2, AuxLossCoeff = 0.02 };
//#endif

    public override Data Data => new()
    {
        // The prefix of a Megatron dataset (<prefix>.bin and <prefix>.idx), e.g. made with `moe preprocess --sft`.
        Prefix = "data/sft_text_document",
        Split = "990,9,1",
//#if (model == "tiny")
        SequenceLength = 128,
//#else
        SequenceLength = 4096,
//#endif
        ResetPositionIds = true,
        EodMaskLoss = true,
        Format = DataFormat.Sft,
    };

    public override Training Training => new()
    {
//#if (model == "tiny")
        GlobalBatchSize = 8 * GPU_COUNT,
        MicroBatchSize = 8,
        LearningRate = 3e-3,
        MinLearningRate = 3e-4,
        WarmupSteps = 10,
        Steps = 60,
//#else
        GlobalBatchSize = 256,
        MicroBatchSize = 1,
        LearningRate = 1e-5,
        MinLearningRate = 1e-6,
        WarmupSteps = 100,
        Steps = 2000,
//#endif
        Precision = Precision.Bf16,
    };
}
