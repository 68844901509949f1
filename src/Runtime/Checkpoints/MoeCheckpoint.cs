using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;

namespace Moe.Runtime.Checkpoints;

/// <summary>
/// The Moe checkpoint format (version <see cref="Version"/>), as Megatron lays out a save folder:
/// <code>
/// SAVE/latest_checkpointed_iteration.txt     the newest complete iteration ("10"), replaced atomically, written last
/// SAVE/iter_0000010/metadata.json            written by rank 0 after every rank's file is complete: layout, settings,
///                                            model config, step, consumed samples, schedule, optimizer, data position,
///                                            RNG and MoE state, every file with its size, every tensor's block
/// SAVE/iter_0000010/rank_00000.safetensors   what global rank 0 owns: weight blocks under hub names, and its
///                                            distributed-optimizer slices (optimizer.main|exp_avg|exp_avg_sq.&lt;parameter&gt;)
/// </code>
/// A save is written into SAVE/.iter_0000010.incomplete, flushed to disk, renamed to iter_0000010, and only then
/// does the pointer move, so an interrupted save never becomes "latest". See docs/checkpoints.md.
/// </summary>
public static class MoeCheckpoint
{
    /// <summary>The "format" field of metadata.json.</summary>
    public const string FormatName = "moe-checkpoint";

    /// <summary>The format version this build writes and the newest it reads.</summary>
    public const int Version = 1;

    /// <summary>Megatron's pointer file name.</summary>
    public const string PointerFile = "latest_checkpointed_iteration.txt";

    /// <summary>The metadata file of an iteration folder, written last.</summary>
    public const string MetadataFile = "metadata.json";

    /// <summary>The safetensors <c>__metadata__</c> key under which a rank file lists its blocks (JSON).</summary>
    public const string BlocksKey = "moe.blocks";

    /// <summary>Megatron's iteration folder name: iter_0000010.</summary>
    public static string IterationFolder(int iteration) => $"iter_{iteration:D7}";

    /// <summary>The folder a save is written into before it is complete.</summary>
    public static string IncompleteFolder(int iteration) => $".{IterationFolder(iteration)}.incomplete";

    /// <summary>Global rank <paramref name="rank"/>'s file.</summary>
    public static string RankFile(int rank) => $"rank_{rank:D5}.safetensors";

    /// <summary>The iteration of an iter_NNNNNNN folder name; null for any other name.</summary>
    public static int? IterationOf(string folderName) =>
        folderName.StartsWith("iter_", StringComparison.Ordinal)
        && int.TryParse(folderName.AsSpan(5), NumberStyles.None, CultureInfo.InvariantCulture, out int n) ? n : null;

    /// <summary>The complete iteration folders of a save folder (those with metadata.json), by iteration.</summary>
    public static IReadOnlyList<(int Iteration, string Path)> CompleteIterations(string saveFolder)
    {
        if (!Directory.Exists(saveFolder)) return [];
        return Directory.GetDirectories(saveFolder)
            .Select(d => (Iteration: IterationOf(System.IO.Path.GetFileName(d)), Path: d))
            .Where(d => d.Iteration is not null && File.Exists(System.IO.Path.Combine(d.Path, MetadataFile)))
            .Select(d => (d.Iteration!.Value, d.Path))
            .OrderBy(d => d.Item1)
            .ToList();
    }

    /// <summary>The iteration named by a save folder's pointer file; null when there is none; a UserError when it is not a number.</summary>
    public static int? ReadPointer(string saveFolder)
    {
        string path = System.IO.Path.Combine(saveFolder, PointerFile);
        if (!File.Exists(path)) return null;
        string text = File.ReadAllText(path).Trim();
        if (!int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out int n))
            throw new UserError($"{path} holds \"{text}\", not an iteration number; it should hold the newest complete iteration (e.g. 10). " +
                $"Fix it by hand or load an iter_NNNNNNN folder explicitly.");
        return n;
    }

    /// <summary>JSON options of metadata.json and the rank files' block lists: snake_case names, indented.</summary>
    public static JsonSerializerOptions Json { get; } = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        WriteIndented = true,
        DefaultIgnoreCondition = JsonIgnoreCondition.Never,
    };

    /// <summary>
    /// Reads metadata.json of an iteration folder: a missing file means the save never completed; a newer format or
    /// another format is refused by name before anything else is read.
    /// </summary>
    public static CheckpointMetadata ReadMetadata(string iterationFolder)
    {
        string path = System.IO.Path.Combine(iterationFolder, MetadataFile);
        if (!File.Exists(path))
            throw new UserError($"{iterationFolder} has no {MetadataFile}: a save writes it last, so this checkpoint is incomplete (the save was interrupted). " +
                "Load the save folder (its latest_checkpointed_iteration.txt names the newest complete one) or an earlier iter_NNNNNNN folder.");
        JsonNode? root;
        try
        {
            root = JsonNode.Parse(File.ReadAllText(path));
        }
        catch (JsonException e)
        {
            throw new UserError($"{path}: not valid JSON ({e.Message}); the checkpoint's metadata is damaged.");
        }
        string? format = root?["format"]?.GetValue<string>();
        if (format != FormatName)
            throw new UserError($"{path}: \"format\" is {(format is null ? "missing" : $"\"{format}\"")}, not \"{FormatName}\"; this is not a Moe checkpoint.");
        int version = root!["format_version"]?.GetValue<int>() ?? 0;
        if (version > Version)
            throw new UserError($"{path}: written in Moe checkpoint format version {version}; this build reads versions up to {Version}. Use a newer Moe to load it.");
        if (version < 1)
            throw new UserError($"{path}: \"format_version\" is {version}; it must be at least 1.");
        try
        {
            return root.Deserialize<CheckpointMetadata>(Json) ?? throw new UserError($"{path}: empty metadata.");
        }
        catch (JsonException e)
        {
            throw new UserError($"{path}: the metadata does not have the format-{Version} fields ({e.Message}).");
        }
    }
}

/// <summary>What <c>--load</c> names, resolved: a Moe checkpoint's iteration folder, or a Hugging Face model folder.</summary>
/// <param name="Path">The iteration folder (Moe) or the model folder (Hugging Face).</param>
/// <param name="IsMoe">True for a Moe checkpoint (everything is restored), false for a Hugging Face folder (weights only).</param>
/// <param name="Given">What the user passed.</param>
public sealed record CheckpointSource(string Path, bool IsMoe, string Given)
{
    /// <summary>
    /// Resolves <paramref name="path"/>: a save folder (its pointer file names the iteration), an iter_NNNNNNN folder,
    /// or a Hugging Face folder (config.json). Every other case — a pointer to a missing or incomplete iteration, a
    /// folder with iterations but no pointer, an interrupted save — is a <see cref="UserError"/> that says what to load.
    /// </summary>
    public static CheckpointSource Resolve(string path)
    {
        if (!Directory.Exists(path)) throw new UserError($"--load {path}: no such directory.");
        if (File.Exists(System.IO.Path.Combine(path, MoeCheckpoint.MetadataFile))) return new(path, true, path);
        var complete = MoeCheckpoint.CompleteIterations(path);
        string Listing() => complete.Count == 0 ? "there is no complete iteration in it"
            : $"its complete iterations are {string.Join(", ", complete.Select(c => System.IO.Path.GetFileName(c.Path)))}";
        if (MoeCheckpoint.ReadPointer(path) is int iteration)
        {
            string folder = System.IO.Path.Combine(path, MoeCheckpoint.IterationFolder(iteration));
            if (!Directory.Exists(folder))
            {
                string replaced = System.IO.Path.Combine(path, "." + MoeCheckpoint.IterationFolder(iteration) + ".replaced");
                string hint = Directory.Exists(replaced) ? $" A save interrupted while replacing it left the previous copy in {replaced}: rename it back to {folder}." : "";
                throw new UserError($"{System.IO.Path.Combine(path, MoeCheckpoint.PointerFile)} names iteration {iteration}, but {folder} does not exist; {Listing()}.{hint} " +
                    "Load one of them explicitly (--load <folder>/iter_NNNNNNN) or fix the pointer file.");
            }
            if (!File.Exists(System.IO.Path.Combine(folder, MoeCheckpoint.MetadataFile)))
                throw new UserError($"{System.IO.Path.Combine(path, MoeCheckpoint.PointerFile)} names iteration {iteration}, but {folder} has no {MoeCheckpoint.MetadataFile} (incomplete); {Listing()}. " +
                    "Load one of them explicitly or fix the pointer file.");
            return new(folder, true, path);
        }
        if (File.Exists(System.IO.Path.Combine(path, "config.json"))) return new(path, false, path);
        if (MoeCheckpoint.IterationOf(System.IO.Path.GetFileName(System.IO.Path.TrimEndingDirectorySeparator(path))) is not null)
            throw new UserError($"{path} has no {MoeCheckpoint.MetadataFile}: a save writes it last, so this checkpoint is incomplete (the save was interrupted); " +
                "load the save folder above it, whose pointer names the newest complete iteration.");
        if (complete.Count > 0)
            throw new UserError($"{path} has no {MoeCheckpoint.PointerFile}, but {Listing()}; load one explicitly (--load {complete[^1].Path}).");
        throw new UserError($"--load {path}: neither a Moe checkpoint ({MoeCheckpoint.PointerFile} or {MoeCheckpoint.MetadataFile}) nor a Hugging Face model folder (config.json) is there.");
    }
}

/// <summary>metadata.json of a Moe checkpoint (format version 1). Field names are written in snake_case.</summary>
public sealed record CheckpointMetadata
{
    /// <summary>Always <see cref="MoeCheckpoint.FormatName"/>.</summary>
    public string Format { get; init; } = MoeCheckpoint.FormatName;

    /// <summary>The format version (<see cref="MoeCheckpoint.Version"/>).</summary>
    public int FormatVersion { get; init; } = MoeCheckpoint.Version;

    /// <summary>Optimizer steps done: the run continues at Iteration + 1.</summary>
    public int Iteration { get; init; }

    /// <summary>Samples the run has consumed (Iteration × GlobalBatchSize): Megatron's consumed_train_samples.</summary>
    public long ConsumedSamples { get; init; }

    /// <summary>When the save completed (UTC, ISO 8601).</summary>
    public string SavedAt { get; init; } = "";

    /// <summary>The layout that wrote it.</summary>
    public CheckpointLayout Layout { get; init; } = new();

    /// <summary>The dtype of the weights in the rank files ("float32" or "bfloat16"); optimizer state is always float32.</summary>
    public string ModelDtype { get; init; } = "float32";

    /// <summary>The model as a Hugging Face config.json (what an export writes).</summary>
    public JsonObject ModelConfig { get; init; } = new();

    /// <summary>Every recipe setting, flattened by path ("Training.Seed": 1234); see <see cref="SettingsSnapshot"/>.</summary>
    public Dictionary<string, JsonNode?> Settings { get; init; } = new(StringComparer.Ordinal);

    /// <summary>The learning-rate schedule (Megatron's OptimizerParamScheduler state).</summary>
    public SchedulerState Scheduler { get; init; } = new();

    /// <summary>The optimizer (the moments themselves are in the rank files).</summary>
    public OptimizerState Optimizer { get; init; } = new();

    /// <summary>Where the data stream stands.</summary>
    public DataPosition Data { get; init; } = new();

    /// <summary>Random-number state.</summary>
    public RngState Rng { get; init; } = new();

    /// <summary>MoE-specific state.</summary>
    public MoeState Moe { get; init; } = new();

    /// <summary>Every rank's file and its size in bytes.</summary>
    public List<CheckpointFile> Files { get; init; } = new();

    /// <summary>Every tensor of every file and the block of the whole tensor it holds.</summary>
    public List<TensorBlock> Tensors { get; init; } = new();
}

/// <summary>The parallel layout that wrote a checkpoint.</summary>
public sealed record CheckpointLayout
{
    public int Gpus { get; init; } = 1;
    public int Tensor { get; init; } = 1;
    public int Pipeline { get; init; } = 1;
    public int Context { get; init; } = 1;
    public int Expert { get; init; } = 1;
    public int ExpertTensor { get; init; } = 1;
    public int DataParallel { get; init; } = 1;
    public int ExpertDataParallel { get; init; } = 1;
    public string Order { get; init; } = "tp-cp-ep-dp-pp";
    public bool DistributedOptimizer { get; init; }

    /// <summary>"4 GPUs (TP 1 · CP 1 · PP 1, EP 2 · ETP 1; DP 2, expert DP 2)".</summary>
    public string Describe() =>
        $"{Gpus} GPU{(Gpus == 1 ? "" : "s")} (TP {Tensor} · CP {Context} · PP {Pipeline}, EP {Expert} · ETP {ExpertTensor}; DP {DataParallel}, expert DP {ExpertDataParallel}" +
        $"{(DistributedOptimizer ? ", distributed optimizer" : "")})";
}

/// <summary>Megatron's OptimizerParamScheduler state: the schedule is a function of the step and these values.</summary>
public sealed record SchedulerState
{
    public string Style { get; init; } = "cosine";
    public double MaxLr { get; init; }
    public double MinLr { get; init; }
    public int WarmupSteps { get; init; }
    public int DecaySteps { get; init; }
    public int NumSteps { get; init; }
    public double LastLr { get; init; }
}

/// <summary>The optimizer's scalar state and hyper-parameters.</summary>
public sealed record OptimizerState
{
    public string Kind { get; init; } = "adamw";
    /// <summary>Adam's t (bias corrections).</summary>
    public int Step { get; init; }
    public double Beta1 { get; init; }
    public double Beta2 { get; init; }
    public double Eps { get; init; }
    public double WeightDecay { get; init; }
    public double ClipGrad { get; init; }
    /// <summary>Whether the state was sharded over data parallel (the rank files hold slices either way).</summary>
    public bool Sharded { get; init; }
}

/// <summary>The data stream's position: sample i of the run is a function of the dataset, seed and sample count, so the position is one number.</summary>
public sealed record DataPosition
{
    public string? Prefix { get; init; }
    public string Split { get; init; } = "";
    public int SequenceLength { get; init; }
    public int GlobalBatchSize { get; init; }
    /// <summary>Samples the dataset was built for (Steps × GlobalBatchSize): its shuffle depends on it.</summary>
    public long TrainSamples { get; init; }
    public int Seed { get; init; }
    /// <summary>The next sample the run reads.</summary>
    public long NextSample { get; init; }
}

/// <summary>Random-number state. Training draws no random numbers today, so there is none to save; this says so explicitly.</summary>
public sealed record RngState
{
    public int Seed { get; init; }
    /// <summary>Generators whose state matters after initialisation (none).</summary>
    public List<string> Generators { get; init; } = new();
    public string Note { get; init; } = "No generator is used after initialisation: no dropout, no router jitter; weights are initialised from per-parameter seeded generators and the data order is a function of the seed and the sample count.";
}

/// <summary>MoE state beyond the weights.</summary>
public sealed record MoeState
{
    /// <summary>Unused (null): the per-expert router bias of aux-loss-free balancing (Router.EnableExpertBias) is saved in the shards as its hub tensor, <c>…block_sparse_moe.gate.e_score_correction_bias</c>.</summary>
    public JsonNode? ExpertBias { get; init; }
    /// <summary>The global-aux-loss tracker is reset after every optimizer step, so it is empty at any step boundary.</summary>
    public string GlobalAuxLossTracker { get; init; } = "empty at a step boundary (reset after every optimizer step)";
    public string LoadBalancing { get; init; } = "";
}

/// <summary>One rank's file.</summary>
public sealed record CheckpointFile(string Name, int Rank, long Bytes);

/// <summary>
/// One tensor of a rank file: the elements [Start, End) of a block of a whole tensor. <see cref="Kind"/> "weight"
/// (<see cref="Key"/> a hub name; the whole block) or "main" / "exp_avg" / "exp_avg_sq" (<see cref="Key"/> a model
/// parameter name; a flat range of the block, the distributed optimizer's slice).
/// </summary>
public sealed record TensorBlock(string File, string Name, string Kind, string Key, string Dtype, long[] GlobalShape, long[] LocalShape, long[] Offsets, long Start, long End)
{
    /// <summary>The range this tensor holds.</summary>
    public BlockRange Range => new(GlobalShape, LocalShape, Offsets, Start, End);

    /// <summary>Weights.</summary>
    public const string Weight = "weight";

    /// <summary>The optimizer's three states, in the order they are written.</summary>
    public static readonly string[] OptimizerKinds = ["main", "exp_avg", "exp_avg_sq"];
}
