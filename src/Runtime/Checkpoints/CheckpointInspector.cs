using System.Text.Json;
using Moe.Runtime.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Checkpoints;

/// <summary>A Moe checkpoint opened for inspection: its folder, metadata and model config, and the save folder's iterations.</summary>
public sealed record InspectedCheckpoint(string Folder, CheckpointMetadata Metadata, MixtralConfig Config, IReadOnlyList<int> Iterations, int? Latest);

/// <summary>
/// <c>moe checkpoint inspect</c> and <c>export</c>: reads a Moe checkpoint without a trainer — its integrity (every
/// rank file present with the size metadata.json records, every tensor where the metadata says, every weight and every
/// optimizer state covered exactly once) and its weights as a Hugging Face folder.
/// </summary>
public static class CheckpointInspector
{
    /// <summary>Opens a save folder (its latest iteration) or an iteration folder; a Hugging Face folder is refused.</summary>
    public static InspectedCheckpoint Open(string path)
    {
        var source = CheckpointSource.Resolve(path);
        if (!source.IsMoe) throw new UserError($"{path} is a Hugging Face model folder, not a Moe checkpoint; there is nothing to inspect or export.");
        var meta = MoeCheckpoint.ReadMetadata(source.Path);
        string where = Path.Combine(source.Path, MoeCheckpoint.MetadataFile);
        var config = MixtralConfig.Parse(JsonSerializer.SerializeToElement(meta.ModelConfig), where + " (model_config)");
        string saveFolder = source.Path == path ? Path.GetDirectoryName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(path)))! : path;
        var iterations = MoeCheckpoint.CompleteIterations(saveFolder).Select(c => c.Iteration).ToList();
        int? latest = null;
        try
        {
            latest = MoeCheckpoint.ReadPointer(saveFolder);
        }
        catch (UserError)
        {
        }
        return new InspectedCheckpoint(source.Path, meta, config, iterations, latest);
    }

    /// <summary>Every problem of the checkpoint, each a sentence naming the file or tensor; empty when it is whole.</summary>
    public static IReadOnlyList<string> Verify(InspectedCheckpoint c)
    {
        var problems = new List<string>();
        var meta = c.Metadata;
        var readable = new HashSet<string>(StringComparer.Ordinal);
        foreach (var f in meta.Files)
        {
            string path = Path.Combine(c.Folder, f.Name);
            if (!File.Exists(path))
            {
                problems.Add($"{path} (rank {f.Rank}) is missing.");
                continue;
            }
            long size = new FileInfo(path).Length;
            if (size != f.Bytes)
            {
                problems.Add($"{path} has {size} bytes; {MoeCheckpoint.MetadataFile} records {f.Bytes} ({(size < f.Bytes ? "truncated" : "changed")}).");
                continue;
            }
            try
            {
                using var file = SafetensorsFile.Open(path);
                foreach (var b in meta.Tensors.Where(b => b.File == f.Name))
                {
                    if (!file.Entries.TryGetValue(b.Name, out var e)) problems.Add($"{path} lacks tensor '{b.Name}'.");
                    else if (e.Dtype != b.Dtype || BlockRange.Volume(e.Shape) != b.End - b.Start)
                        problems.Add($"{path}: '{b.Name}' is {e.Dtype} [{string.Join(", ", e.Shape)}], the metadata says {b.Dtype} with {b.End - b.Start} elements.");
                }
                readable.Add(f.Name);
            }
            catch (UserError e)
            {
                problems.Add(e.Message);
            }
        }
        if (meta.Files.Count != meta.Layout.Gpus)
            problems.Add($"{MoeCheckpoint.MetadataFile} lists {meta.Files.Count} rank files for a layout of {meta.Layout.Gpus} GPUs.");
        foreach (var stray in Directory.GetFiles(c.Folder, "rank_*.safetensors").Select(Path.GetFileName).Where(n => meta.Files.All(f => f.Name != n)))
            problems.Add($"{Path.Combine(c.Folder, stray!)} is not listed in {MoeCheckpoint.MetadataFile}.");
        foreach (var b in meta.Tensors.Where(b => meta.Files.All(f => f.Name != b.File)).Take(1))
            problems.Add($"tensor '{b.Name}' is in file {b.File}, which {MoeCheckpoint.MetadataFile} does not list.");

        // Coverage: each hub tensor exactly once; each parameter's optimizer states exactly once.
        var expected = MixtralStateDictAdapter.HubShapes(c.Config);
        var weights = meta.Tensors.Where(b => b.Kind == TensorBlock.Weight).ToLookup(b => b.Key);
        foreach (var (key, shape) in expected) CheckCoverage(problems, $"weight '{key}'", shape, weights[key].ToList());
        foreach (var extra in weights.Select(g => g.Key).Except(expected.Select(e => e.Key)))
            problems.Add($"weight '{extra}' is not a tensor of this model ({c.Config.Layers} layers, {c.Config.Experts} experts).");
        long modelElements = expected.Sum(e => BlockRange.Volume(e.Shape));
        foreach (var kind in TensorBlock.OptimizerKinds)
        {
            var blocks = meta.Tensors.Where(b => b.Kind == kind).ToLookup(b => b.Key);
            foreach (var g in blocks) CheckCoverage(problems, $"{kind} of '{g.Key}'", g.First().GlobalShape, g.ToList());
            long total = blocks.Sum(g => BlockRange.Volume(g.First().GlobalShape));
            if (total != modelElements)
                problems.Add($"the optimizer's {kind} covers parameters of {total} elements; the model has {modelElements}.");
        }
        if (meta.Optimizer.Step != meta.Iteration)
            problems.Add($"{MoeCheckpoint.MetadataFile}: optimizer step {meta.Optimizer.Step} ≠ iteration {meta.Iteration}.");
        return problems;
    }

    private static void CheckCoverage(List<string> problems, string what, long[] shape, List<TensorBlock> blocks)
    {
        long whole = BlockRange.Volume(shape);
        if (blocks.Count == 0)
        {
            problems.Add($"{what} is missing (no rank holds it).");
            return;
        }
        var bad = blocks.FirstOrDefault(b => !b.GlobalShape.SequenceEqual(shape));
        if (bad is not null)
        {
            problems.Add($"{what} is [{string.Join(", ", bad.GlobalShape)}] in {bad.File}; the model's is [{string.Join(", ", shape)}].");
            return;
        }
        long covered = blocks.Sum(b => b.End - b.Start), overlap = 0;
        for (int i = 0; i < blocks.Count; i++)
            for (int j = i + 1; j < blocks.Count; j++) overlap += BlockCopy.Overlap(blocks[i].Range, blocks[j].Range);
        if (overlap > 0) problems.Add($"{what}: blocks overlap by {overlap} elements.");
        else if (covered != whole) problems.Add($"{what}: the blocks hold {covered} of its {whole} elements.");
    }

    /// <summary>
    /// Writes the checkpoint's weights as a Hugging Face folder (config.json and hub-named safetensors, sharded above
    /// <paramref name="maxShardBytes"/>), each tensor assembled whole from its blocks, one at a time. Refuses a checkpoint
    /// with problems and an output folder that is not empty; writes into a temporary folder renamed when complete.
    /// </summary>
    public static void Export(string path, string output, TextWriter log, long maxShardBytes = 5_000_000_000)
    {
        var c = Open(path);
        var problems = Verify(c);
        if (problems.Count > 0)
            throw new UserError($"{c.Folder} cannot be exported: {problems.Count} problem(s): {string.Join(" ", problems.Take(5))}");
        if (Directory.Exists(output) && Directory.EnumerateFileSystemEntries(output).Any())
            throw new UserError($"--hf {output} exists and is not empty; export into a new folder.");
        string full = Path.GetFullPath(output);
        string temp = Path.Combine(Path.GetDirectoryName(full)!, "." + Path.GetFileName(full) + ".incomplete");
        if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true);
        var meta = c.Metadata;
        var weights = meta.Tensors.Where(b => b.Kind == TensorBlock.Weight).ToLookup(b => b.Key);
        using var files = new RankFiles(c.Folder, meta);
        var tensors = MixtralStateDictAdapter.HubShapes(c.Config).Select(e =>
        {
            var blocks = weights[e.Key].ToList();
            var dtype = SafetensorsFile.ScalarTypeOf(blocks[0].Dtype, c.Folder, e.Key);
            return new PendingTensor(e.Key, dtype, e.Shape, () =>
            {
                var whole = torch.empty(e.Shape, dtype: dtype);
                CheckpointReader.Fill(whole, new BlockRange(e.Shape, e.Shape, new long[e.Shape.Length], 0, BlockRange.Volume(e.Shape)), blocks, files, $"weight '{e.Key}'");
                return whole;
            });
        }).ToList();
        try
        {
            MixtralStateDictAdapter.WriteFolder(temp, tensors, MixtralStateDictAdapter.HubConfig(c.Config, meta.ModelDtype), maxShardBytes);
            if (Directory.Exists(output)) Directory.Delete(output);
            Directory.Move(temp, output);
        }
        catch
        {
            if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true);
            throw;
        }
        log.WriteLine($"exported {c.Folder} (iteration {meta.Iteration}) to {output}: config.json and {tensors.Count} tensors under Hugging Face names, {meta.ModelDtype}");
    }
}
