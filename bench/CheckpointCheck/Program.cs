// The `moe` verbs bound to the two recipes the GPU checkpoint check (bench/gpu/checkpoint.sh, issue 14) needs and no
// shipped recipe is:
//   tiny-fp32    TinyMixtral in fp32 with micro-batches of 4 (so that one GPU and EP 2 × DP 2 see the same global batch):
//                exact resume on CUDA, and resume at another GPU count;
//   mixtral-2l   Mixtral 8x7B's shapes with 2 layers, bf16, 1024-token samples of TinyMixtral's data, 2 steps: what a
//                save and a load of a Mixtral-shaped checkpoint cost (the `saved …` and `resumed …` lines give GB/s).
// Usage: CheckpointCheck tiny-fp32|mixtral-2l train [train options]   (also: checkpoint inspect|export, plan)
using Moe.Dsl;
using Moe.Runtime.Commands;

var tiny = new Moe.Recipes.TinyMixtral().ToSettings();
RecipeSettings? recipe = args.FirstOrDefault() switch
{
    "tiny-fp32" => tiny with
    {
        Name = "TinyMixtralFp32",
        Training = tiny.Training with { Precision = Precision.Fp32, MicroBatchSize = 4 },
    },
    "mixtral-2l" => tiny with
    {
        Name = "Mixtral8x7bTwoLayers",
        Model = Model.Mixtral8x7B with { Layers = 2 },
        Data = tiny.Data with { SequenceLength = 1024 },
        Training = tiny.Training with { GlobalBatchSize = 2, MicroBatchSize = 1, Steps = 2, WarmupSteps = 0, LearningRate = 1e-5, MinLearningRate = 1e-6 },
    },
    _ => null,
};
if (recipe is null)
{
    Console.Error.WriteLine("usage: CheckpointCheck tiny-fp32|mixtral-2l train [options]");
    return 2;
}
return MoeCommands.Run(MoeCommands.CreateRoot(recipe), args[1..]);
