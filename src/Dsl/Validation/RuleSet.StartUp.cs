using System.Collections.Generic;
using static Moe.Dsl.Validation.Arithmetic;

namespace Moe.Dsl.Validation;

public static partial class RuleSet
{
    private const RuleCategory StartCat = RuleCategory.StartUp;

    private static IEnumerable<Rule> StartUpRules()
    {
        // MOE0901: the recipe's Gpus is re-checked against the launcher.
        var world = D(DiagnosticIds.WorldSizeMismatch, "Gpus must equal the launcher's world size", StartCat, "R001, R003",
            "Parallelism.Gpus");
        yield return new Rule(world, (s, ctx) => ctx?.WorldSize is int w && w != s.Parallelism.Gpus
            ? One(world, $"The recipe asks for Gpus = {F(s.Parallelism.Gpus)} but the launcher started {F(w)} processes (WORLD_SIZE); pass --gpus {F(w)} or start {F(s.Parallelism.Gpus)} processes", null, "Parallelism.Gpus")
            : None);

        // MOE0903: files named by the recipe.
        var files = D(DiagnosticIds.InputFileMissing, "Data and checkpoint files must exist", StartCat, "Moe",
            "Data.Prefix", "Data.Tokenizer");
        yield return new Rule(files, (s, ctx) => MissingFiles(files, s, ctx!));

        // MOE0904 (R035): kernel ordering on pre-Blackwell GPUs.
        var connections = W(DiagnosticIds.CudaDeviceMaxConnections, "Tensor or context parallel wants CUDA_DEVICE_MAX_CONNECTIONS=1", StartCat, "R035",
            "Parallelism.Tensor", "Parallelism.Context");
        yield return new Rule(connections, (s, ctx) => ctx!.PreBlackwellGpu && (s.Parallelism.Tensor > 1 || s.Parallelism.Context > 1) && ctx.Environment("CUDA_DEVICE_MAX_CONNECTIONS") != "1"
            ? One(connections, $"Tensor ({F(s.Parallelism.Tensor)}) or Context ({F(s.Parallelism.Context)}) parallel on a pre-Blackwell GPU needs CUDA_DEVICE_MAX_CONNECTIONS=1 so communication kernels are scheduled in issue order; set it in the job's environment", null, "Parallelism.Tensor")
            : None);
    }

    private static IEnumerable<Finding> MissingFiles(RuleDescriptor d, RecipeSettings s, StartUpContext ctx)
    {
        if (s.Data.Prefix is string prefix)
        {
            foreach (var ext in new[] { ".bin", ".idx" })
            {
                if (!ctx.FileExists(prefix + ext))
                    yield return new Finding(d, $"Data.Prefix \"{prefix}\": {prefix + ext} does not exist; run `moe preprocess` to make it, or fix the prefix (without .bin/.idx)", new[] { "Data.Prefix" });
            }
        }
        if (s.Data.Tokenizer is string tok && !ctx.FileExists(tok))
            yield return new Finding(d, $"Data.Tokenizer \"{tok}\" does not exist", new[] { "Data.Tokenizer" });
    }
}
