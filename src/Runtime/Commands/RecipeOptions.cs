using System.CommandLine;
using System.Globalization;
using Moe.Dsl;
using Moe.Dsl.Layout;

namespace Moe.Runtime.Commands;

/// <summary>
/// The small, frozen set of recipe settings the command line may override (cf. torchtitan's
/// test_no_new_cli_options). Defaults come from the recipe; the rule set re-validates the result at
/// start-up. Adding an option here is a deliberate change: the meta-test lists them.
/// </summary>
public sealed class RecipeOptions
{
    public Option<int> Gpus { get; }
    public Option<int> Tensor { get; }
    public Option<int> Pipeline { get; }
    public Option<int> Context { get; }
    public Option<int> Expert { get; }
    public Option<int?> ExpertTensor { get; }
    public Option<bool> SequenceParallel { get; }
    public Option<string> Order { get; }
    public Option<int> MicroBatchSize { get; }
    public Option<int> GlobalBatchSize { get; }
    public Option<int> Steps { get; }
    public Option<int> WarmupSteps { get; }
    public Option<int?> EvalInterval { get; }
    public Option<double> LearningRate { get; }
    public Option<int> SequenceLength { get; }
    public Option<string?> DataPath { get; }
    public Option<string?> Load { get; }
    public Option<string?> Save { get; }
    public Option<int?> SaveInterval { get; }
    public Option<int?> KeepLast { get; }
    public Option<int> Seed { get; }
    public Option<string> Precision { get; }
    public Option<bool> OverlapGradReduce { get; }
    public RecomputeOptions Recompute { get; }

    public RecipeOptions(RecipeSettings defaults)
    {
        var p = defaults.Parallelism;
        var t = defaults.Training;
        Gpus = Int("--gpus", Doc("Parallelism.Gpus", "Total number of GPUs (world size). Megatron: the launcher's WORLD_SIZE."), p.Gpus);
        Tensor = Int("--tp", Doc("Parallelism.Tensor", "Tensor-parallel size. Megatron: --tensor-model-parallel-size."), p.Tensor);
        Pipeline = Int("--pp", Doc("Parallelism.Pipeline", "Pipeline-parallel size. Megatron: --pipeline-model-parallel-size."), p.Pipeline);
        Context = Int("--cp", Doc("Parallelism.Context", "Context-parallel size. Megatron: --context-parallel-size."), p.Context);
        Expert = Int("--ep", Doc("Parallelism.Expert", "Expert-parallel size. Megatron: --expert-model-parallel-size."), p.Expert);
        ExpertTensor = new Option<int?>("--etp")
        {
            Description = Doc("Parallelism.ExpertTensor", "Expert tensor-parallel size (default: equal to --tp). Megatron: --expert-tensor-parallel-size."),
            DefaultValueFactory = _ => p.ExpertTensor,
        };
        SequenceParallel = new Option<bool>("--sequence-parallel")
        {
            Description = Doc("Parallelism.SequenceParallel", "Sequence parallelism (needs --tp > 1). Megatron: --sequence-parallel."),
            DefaultValueFactory = _ => p.SequenceParallel,
        };
        Order = OrderOption(p.Order);
        MicroBatchSize = Int("--micro-batch-size", Doc("Training.MicroBatchSize", "Samples per forward/backward on one rank. Megatron: --micro-batch-size."), t.MicroBatchSize);
        GlobalBatchSize = Int("--global-batch-size", Doc("Training.GlobalBatchSize", "Samples per optimizer step over all data-parallel ranks. Megatron: --global-batch-size."), t.GlobalBatchSize);
        Steps = Int("--steps", Doc("Training.Steps", "Optimizer steps. Megatron: --train-iters."), t.Steps);
        WarmupSteps = Int("--warmup-steps", Doc("Training.WarmupSteps", "Linear warm-up steps. Megatron: --lr-warmup-iters."), t.WarmupSteps);
        EvalInterval = new Option<int?>("--eval-interval")
        {
            Description = Doc("Training.EvalInterval", "Evaluate the validation split every this many steps. Megatron: --eval-interval."),
            DefaultValueFactory = _ => t.EvalInterval,
        };
        LearningRate = new Option<double>("--lr")
        {
            Description = Doc("Training.LearningRate", "Peak learning rate. Megatron: --lr."),
            DefaultValueFactory = _ => t.LearningRate,
        };
        SequenceLength = Int("--seq-length", Doc("Data.SequenceLength", "Tokens per sample. Megatron: --seq-length."), defaults.Data.SequenceLength);
        DataPath = Text("--data-path", Doc("Data.Prefix", "Dataset prefix without .bin/.idx. Megatron: --data-path."), defaults.Data.Prefix);
        Load = Text("--load", Doc("Checkpoint.Load", "Checkpoint to start from (Hugging Face directory or Moe checkpoint). Megatron: --load."), defaults.Checkpoint.Load);
        Save = Text("--save", Doc("Checkpoint.Save", "Directory to save checkpoints to. Megatron: --save."), defaults.Checkpoint.Save);
        SaveInterval = new Option<int?>("--save-interval")
        {
            Description = Doc("Checkpoint.Interval", "Save every this many steps. Megatron: --save-interval."),
            DefaultValueFactory = _ => defaults.Checkpoint.Interval,
        };
        KeepLast = new Option<int?>("--keep-last")
        {
            Description = Doc("Checkpoint.KeepLast", "Keep only the newest this many checkpoints in --save."),
            DefaultValueFactory = _ => defaults.Checkpoint.KeepLast,
        };
        Seed = Int("--seed", Doc("Training.Seed", "Random seed. Megatron: --seed."), t.Seed);
        Precision = new Option<string>("--precision")
        {
            Description = Doc("Training.Precision", "bf16 (fp32 main weights and gradients) or fp32. Megatron: --bf16."),
            DefaultValueFactory = _ => t.Precision == Dsl.Precision.Bf16 ? "bf16" : "fp32",
        };
        Precision.AcceptOnlyFromAmong("bf16", "fp32");
        OverlapGradReduce = new Option<bool>("--overlap-grad-reduce")
        {
            Description = Doc("Training.OverlapGradReduce", "Overlap the expert gradients' data-parallel reduction with the backward. Megatron: --overlap-grad-reduce."),
            DefaultValueFactory = _ => t.OverlapGradReduce,
        };
        Recompute = new RecomputeOptions(defaults.Recompute);
    }

    /// <summary>Every option, in the order help lists them.</summary>
    public IEnumerable<Option> All => [Gpus, Tensor, Pipeline, Context, Expert, ExpertTensor, SequenceParallel, Order,
        MicroBatchSize, GlobalBatchSize, Steps, WarmupSteps, EvalInterval, LearningRate, SequenceLength, DataPath, Load, Save, SaveInterval, KeepLast, Seed, Precision, OverlapGradReduce, .. Recompute.All];

    /// <summary>Adds every option to a command.</summary>
    public void AddTo(Command command)
    {
        foreach (var option in All) command.Options.Add(option);
    }

    /// <summary>The recipe with the command line's values applied.</summary>
    public RecipeSettings Apply(RecipeSettings recipe, ParseResult parse) => recipe with
    {
        Parallelism = recipe.Parallelism with
        {
            Gpus = parse.GetValue(Gpus),
            Tensor = parse.GetValue(Tensor),
            Pipeline = parse.GetValue(Pipeline),
            Context = parse.GetValue(Context),
            Expert = parse.GetValue(Expert),
            ExpertTensor = parse.GetValue(ExpertTensor),
            SequenceParallel = parse.GetValue(SequenceParallel),
            Order = ParseOrder(parse.GetValue(Order)!),
        },
        Training = recipe.Training with
        {
            MicroBatchSize = parse.GetValue(MicroBatchSize),
            GlobalBatchSize = parse.GetValue(GlobalBatchSize),
            Steps = parse.GetValue(Steps),
            WarmupSteps = parse.GetValue(WarmupSteps),
            EvalInterval = parse.GetValue(EvalInterval),
            LearningRate = parse.GetValue(LearningRate),
            Seed = parse.GetValue(Seed),
            Precision = parse.GetValue(Precision) == "fp32" ? Dsl.Precision.Fp32 : Dsl.Precision.Bf16,
            OverlapGradReduce = parse.GetValue(OverlapGradReduce),
        },
        Data = recipe.Data with
        {
            SequenceLength = parse.GetValue(SequenceLength),
            Prefix = parse.GetValue(DataPath),
        },
        Checkpoint = recipe.Checkpoint with
        {
            Load = parse.GetValue(Load),
            Save = parse.GetValue(Save),
            Interval = parse.GetValue(SaveInterval),
            KeepLast = parse.GetValue(KeepLast),
        },
        Recompute = Recompute.Parse(parse),
    };

    /// <summary>The --order option (shared with <c>moe layout</c>).</summary>
    public static Option<string> OrderOption(RankOrder defaultOrder)
    {
        var option = new Option<string>("--order")
        {
            Description = Doc("Parallelism.Order", "Rank order: tp-cp-ep-dp-pp (Megatron's default) or tp-cp-ep-pp-dp (--use-tp-pp-dp-mapping)."),
            DefaultValueFactory = _ => RankLayout.OrderName(defaultOrder),
        };
        option.AcceptOnlyFromAmong(RankLayout.OrderName(RankOrder.TpCpEpDpPp), RankLayout.OrderName(RankOrder.TpCpEpPpDp));
        return option;
    }

    public static RankOrder ParseOrder(string text) =>
        RankLayout.ParseOrder(text) ?? throw new UserError($"--order {text} is not a Megatron order; use tp-cp-ep-dp-pp or tp-cp-ep-pp-dp.");

    private static Option<int> Int(string name, string description, int defaultValue) => new(name)
    {
        Description = description,
        DefaultValueFactory = _ => defaultValue,
    };

    private static Option<string?> Text(string name, string description, string? defaultValue) => new(name)
    {
        Description = description,
        DefaultValueFactory = _ => defaultValue,
    };

    /// <summary>The setting's XML summary (the recipe docs are the help text), else <paramref name="fallback"/>.</summary>
    private static string Doc(string settingPath, string fallback) => SettingDocs.Summary(settingPath) ?? fallback;

    internal static string Invariant(double value) => value.ToString("R", CultureInfo.InvariantCulture);
}
