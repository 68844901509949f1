using Moe.Dsl.Layout;
using System.Globalization;
using Moe.Dsl;
using Moe.Runtime.Modeling;
using Moe.Runtime.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Checkpoints;

/// <summary>How a checkpoint being loaded may differ from the recipe.</summary>
/// <param name="AllowChanged">
/// Settings whose change is intended (<c>--allow-changed seed,Capacity.Factor</c>): setting paths, their last part or
/// their group, case-insensitive (<see cref="SettingsSnapshot.Allows"/>).
/// </param>
public sealed record CheckpointLoadOptions(IReadOnlyCollection<string> AllowChanged)
{
    /// <summary>No change allowed.</summary>
    public static CheckpointLoadOptions None { get; } = new([]);

    /// <summary>Parses the comma-separated value of <c>--allow-changed</c> (repeatable).</summary>
    public static CheckpointLoadOptions Parse(IEnumerable<string>? values) =>
        new((values ?? []).SelectMany(v => v.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)).ToArray());
}

/// <summary>
/// Loads checkpoints into a trainer of any layout: a Hugging Face folder (weights only) or a Moe checkpoint (weights,
/// optimizer state and step — an exact resume), resharded to this rank's blocks.
/// </summary>
/// <remarks>
/// Resharding: metadata.json lists every tensor of every rank file with the block of the whole tensor it holds. For
/// each hub tensor of this rank's model, and for each of its distributed-optimizer slices, the reader takes the
/// checkpoint's blocks that overlap the one it needs, maps only those files (zero-copy, the page cache is the only
/// copy) and copies the overlaps (<see cref="BlockCopy"/>), one parameter at a time; the copied counts must add up to
/// the target exactly, else the checkpoint is incomplete and the error names the tensor. Loading has no collective:
/// each rank reads on its own.
/// </remarks>
public static class CheckpointReader
{
    /// <summary>
    /// Copies a Hugging Face folder's weights into <paramref name="model"/> (this rank's blocks) after comparing its
    /// config.json with the recipe's model field by field. The step, schedule, optimizer and data start fresh, and the
    /// run says so.
    /// </summary>
    public static void LoadHuggingFace(MixtralModel model, CheckpointSource source, RecipeSettings settings, CheckpointLoadOptions? options, TextWriter log)
    {
        var allowed = (options ?? CheckpointLoadOptions.None).AllowChanged;
        SettingsSnapshot.CheckAllowed(allowed, settings);
        var hub = MixtralStateDictAdapter.ReadConfig(source.Path);
        var m = settings.Model;
        var fields = new (string Hub, string Path, object? Checkpoint, object? Recipe)[]
        {
            ("vocab_size", "Model.VocabSize", hub.VocabSize, m.VocabSize),
            ("hidden_size", "Model.HiddenSize", hub.HiddenSize, m.HiddenSize),
            ("intermediate_size", "Model.IntermediateSize", hub.IntermediateSize, m.IntermediateSize),
            ("num_hidden_layers", "Model.Layers", hub.Layers, m.Layers),
            ("num_attention_heads", "Model.AttentionHeads", hub.Heads, m.AttentionHeads),
            ("num_key_value_heads", "Model.KeyValueHeads", hub.KeyValueHeads, m.KeyValueHeads),
            ("head_dim", "Model.HeadDim", hub.HeadDim, m.EffectiveHeadDim),
            ("num_local_experts", "Model.Experts", hub.Experts, m.Experts),
            ("tie_word_embeddings", "Model.TieWordEmbeddings", hub.TieWordEmbeddings, m.TieWordEmbeddings),
            ("num_experts_per_tok", "Model.ExpertsPerToken", hub.TopK, m.ExpertsPerToken),
            ("rope_theta", "Model.RopeTheta", hub.RopeTheta, m.RopeTheta),
            ("rms_norm_eps", "Model.RmsNormEps", hub.RmsNormEps, m.RmsNormEps),
            ("router_aux_loss_coef", "Model.RouterAuxLossCoef", hub.RouterAuxLossCoef, m.RouterAuxLossCoef),
            ("max_position_embeddings", "Model.MaxPositionEmbeddings", hub.MaxPositionEmbeddings, m.MaxPositionEmbeddings),
            ("sliding_window", "Model.SlidingWindow", hub.SlidingWindow, m.SlidingWindow),
            ("bos_token_id", "Model.BosTokenId", hub.BosTokenId, m.BosTokenId),
            ("eos_token_id", "Model.EosTokenId", hub.EosTokenId, m.EosTokenId),
        };
        var different = fields.Where(f => !Equals(f.Checkpoint, f.Recipe)).ToList();
        string Show(object? v) => v is null ? "null" : Convert.ToString(v, CultureInfo.InvariantCulture)!;
        string List(IEnumerable<(string Hub, string Path, object? Checkpoint, object? Recipe)> fs) =>
            string.Join(", ", fs.Select(f => $"{f.Hub} {Show(f.Checkpoint)} ≠ {f.Path} {Show(f.Recipe)}"));
        var shape = different.Where(f => SettingsSnapshot.IsShape(f.Path)).ToList();
        string config = Path.Combine(source.Path, "config.json");
        if (shape.Count > 0)
            throw new UserError($"{config} describes another model than the recipe's {m.Name}: {List(shape)}; choose the matching Model preset.");
        var refused = different.Where(f => !SettingsSnapshot.Allows(allowed, f.Path)).ToList();
        if (refused.Count > 0)
            throw new UserError($"{config} differs from the recipe's {m.Name}: {List(refused)}. Set the recipe's Model to match, or pass " +
                $"--allow-changed {string.Join(",", refused.Select(f => f.Path))} if training with the recipe's values is intended.");
        foreach (var f in different) log.WriteLine($"note: {f.Hub} is {Show(f.Checkpoint)} in {config}; training uses the recipe's {Show(f.Recipe)} (--allow-changed).");
        MixtralStateDictAdapter.Load(model, source.Path);
        log.WriteLine($"loaded the weights of the Hugging Face model in {source.Path}; weights only — the step, the learning-rate schedule, " +
            "the optimizer moments and the data order start fresh.");
    }

    /// <summary>
    /// Restores a Moe checkpoint into <paramref name="trainer"/> (its model and optimizer exist, at any layout): checks the
    /// settings, copies this rank's weight blocks and optimizer slices, sets Adam's step count. Returns the iteration.
    /// </summary>
    public static int Restore(Trainer trainer, CheckpointSource source, CheckpointLoadOptions? options, TextWriter log)
    {
        string folder = source.Path;
        var meta = MoeCheckpoint.ReadMetadata(folder);
        SettingsSnapshot.Check(meta.Settings, trainer.Settings, (options ?? CheckpointLoadOptions.None).AllowChanged, Path.Combine(folder, MoeCheckpoint.MetadataFile), log);
        var t = trainer.Settings.Training;
        if (meta.Optimizer.Step != meta.Iteration)
            throw new UserError($"{Path.Combine(folder, MoeCheckpoint.MetadataFile)}: the optimizer has taken {meta.Optimizer.Step} steps at iteration {meta.Iteration}; the metadata is inconsistent.");

        var watch = System.Diagnostics.Stopwatch.StartNew();
        long bytes = 0;
        using var files = new RankFiles(folder, meta);
        var byKey = meta.Tensors.ToLookup(b => (b.Kind, b.Key));
        using (torch.no_grad())
        {
            foreach (var h in MixtralStateDictAdapter.HubTensors(trainer.Model))
            {
                using var scope = torch.NewDisposeScope();
                var target = h.Slice(h.Parameter);   // a view of the parameter; its elements in the hub block's order
                var geometry = h.Block ?? TensorShard.Whole(h.BlockShape);
                Fill(target, BlockRange.Whole(geometry), byKey[(TensorBlock.Weight, h.Key)], files, $"weight '{h.Key}'");
                bytes += target.NumberOfElements * target.ElementSize;
            }
            var parameters = trainer.Parameters.ToDictionary(p => p.Name, StringComparer.Ordinal);
            foreach (var slice in trainer.Optimizer.StateSlices())
            {
                using var scope = torch.NewDisposeScope();
                var states = new[] { slice.Main, slice.ExpAvg, slice.ExpAvgSq };
                // Each piece of the parameter the slice covers (one, or a q/k/v weight's two with replicated key-value heads).
                foreach (var (_, piece, from, to) in parameters[slice.Entry.Name].BlocksWithin(slice.BlockStart, slice.Length))
                {
                    var range = BlockRange.Of(piece.Block, from - piece.Start, to - piece.Start);
                    for (int k = 0; k < states.Length; k++)
                        Fill(states[k].narrow(0, from - slice.BlockStart, to - from), range, byKey[(TensorBlock.OptimizerKinds[k], slice.Entry.Name)], files,
                            $"{TensorBlock.OptimizerKinds[k]} of '{slice.Entry.Name}'");
                }
                bytes += 3 * 4 * slice.Length;
            }
        }
        trainer.Optimizer.RestoreSteps(meta.Optimizer.Step);
        if (trainer.Rank.Device.type == DeviceType.CUDA) torch.cuda.synchronize();
        double seconds = watch.Elapsed.TotalSeconds;

        var layout = trainer.Rank.Groups.Layout;
        string now = new CheckpointLayout
        {
            Gpus = layout.World, Tensor = layout.Tensor, Pipeline = layout.Pipeline, Context = layout.Context, Expert = layout.Expert,
            ExpertTensor = layout.ExpertTensor, DataParallel = layout.DataParallel, ExpertDataParallel = layout.ExpertDataParallel,
            Order = RankLayout.OrderName(layout.Order), DistributedOptimizer = trainer.Optimizer.Sharded,
        }.Describe();
        string then = meta.Layout.Describe();
        log.WriteLine($"resumed from {folder}: iteration {meta.Iteration} done, {meta.ConsumedSamples} samples consumed; continuing at step {meta.Iteration + 1} of {t.Steps}" +
            (then == now ? "" : $" (resharded from {then} to {now})") +
            string.Create(CultureInfo.InvariantCulture, $"; this rank read {bytes / 1e6:F1} MB in {seconds:F2} s ({bytes / 1e9 / Math.Max(seconds, 1e-9):F2} GB/s)"));
        if (meta.Iteration >= t.Steps) log.WriteLine($"note: the checkpoint is at step {meta.Iteration}, the recipe trains {t.Steps} steps: nothing is left to train.");
        return meta.Iteration;
    }

    /// <summary>
    /// Copies into <paramref name="target"/> (the elements of <paramref name="range"/>) every overlapping block of
    /// <paramref name="sources"/>; the copied elements must add up to the range exactly.
    /// </summary>
    internal static void Fill(Tensor target, BlockRange range, IEnumerable<TensorBlock> sources, RankFiles files, string what)
    {
        var dst = target.is_contiguous() ? target : target.contiguous();
        long covered = 0;
        foreach (var block in sources)
        {
            if (!block.GlobalShape.SequenceEqual(range.GlobalShape))
                throw new UserError($"{files.Folder}: {what} is [{string.Join(", ", block.GlobalShape)}] in the checkpoint ({block.File}) but [{string.Join(", ", range.GlobalShape)}] in this model.");
            if (BlockCopy.Overlap(range, block.Range) == 0) continue;
            using var source = files.Map(block);
            covered += BlockCopy.Copy(dst, range, source, block.Range);
        }
        if (covered != range.Length)
            throw new UserError($"{files.Folder}: the checkpoint holds {covered} of the {range.Length} elements of {what} this rank needs " +
                $"({(covered < range.Length ? "some are missing" : "blocks overlap")}); the checkpoint is incomplete or damaged (`moe checkpoint inspect` lists what is wrong).");
        if (!ReferenceEquals(dst, target)) target.copy_(dst);
    }
}

/// <summary>
/// The rank files of a checkpoint, opened (memory-mapped) on first use only: a rank maps the files that hold blocks it
/// needs. Each file's size is checked against metadata.json before it is mapped, so a truncated or missing shard is
/// named, never half-read.
/// </summary>
internal sealed class RankFiles(string folder, CheckpointMetadata meta) : IDisposable
{
    private readonly Dictionary<string, SafetensorsFile> _open = new(StringComparer.Ordinal);
    private readonly Dictionary<string, CheckpointFile> _listed = meta.Files.ToDictionary(f => f.Name, StringComparer.Ordinal);

    public string Folder => folder;

    /// <summary>The tensor of <paramref name="block"/> as a zero-copy view of its file, checked against the block.</summary>
    public Tensor Map(TensorBlock block)
    {
        var file = Open(block.File);
        if (!file.Entries.TryGetValue(block.Name, out var entry))
            throw new UserError($"{file.Path}: has no tensor '{block.Name}', which {MoeCheckpoint.MetadataFile} lists; the checkpoint is damaged.");
        if (BlockRange.Volume(entry.Shape) != block.End - block.Start || entry.Dtype != block.Dtype)
            throw new UserError($"{file.Path}: tensor '{block.Name}' is {entry.Dtype} [{string.Join(", ", entry.Shape)}] but {MoeCheckpoint.MetadataFile} records {block.Dtype} " +
                $"with {block.End - block.Start} elements; the checkpoint is damaged.");
        return file.Map(block.Name);
    }

    private SafetensorsFile Open(string name)
    {
        if (_open.TryGetValue(name, out var f)) return f;
        string path = Path.Combine(folder, name);
        if (!_listed.TryGetValue(name, out var listed))
            throw new UserError($"{folder}: a tensor names file {name}, which {MoeCheckpoint.MetadataFile} does not list; the checkpoint is damaged.");
        if (!File.Exists(path))
            throw new UserError($"{path} is missing: {MoeCheckpoint.MetadataFile} lists it ({listed.Bytes} bytes, written by rank {listed.Rank}). The checkpoint is incomplete; load an earlier iteration.");
        long size = new FileInfo(path).Length;
        if (size != listed.Bytes)
            throw new UserError($"{path} has {size} bytes but {MoeCheckpoint.MetadataFile} records {listed.Bytes}: the file is {(size < listed.Bytes ? "truncated" : "not the one saved")}. Load an earlier iteration.");
        return _open[name] = SafetensorsFile.Open(path);
    }

    public void Dispose()
    {
        foreach (var f in _open.Values) f.Dispose();
        _open.Clear();
    }
}
