using System.Globalization;
using Moe.Runtime.Checkpoints;

namespace Moe.Runtime.Commands.Checkpoint;

/// <summary><c>moe checkpoint</c>: what a Moe checkpoint holds, whether it is whole, and its weights as a Hugging Face folder.</summary>
public static class CheckpointCommand
{
    /// <summary>Prints the checkpoint's summary and integrity; a problem is a <see cref="UserError"/> (exit code 2) listing every one.</summary>
    public static int Inspect(string path, TextWriter output)
    {
        var c = CheckpointInspector.Open(path);
        var m = c.Metadata;
        var config = c.Config;
        long weights = Bytes(m, b => b.Kind == TensorBlock.Weight), optimizer = Bytes(m, b => b.Kind != TensorBlock.Weight);
        string Mb(long bytes) => string.Create(CultureInfo.InvariantCulture, $"{bytes / 1e6:F1} MB");
        output.WriteLine($"{c.Folder}: Moe checkpoint, format {m.FormatVersion}, iteration {m.Iteration} ({m.ConsumedSamples} samples consumed; the next step is {m.Iteration + 1}), saved {m.SavedAt}");
        if (c.Iterations.Count > 0)
            output.WriteLine($"  save folder: complete iterations {string.Join(", ", c.Iterations)}; latest_checkpointed_iteration.txt: {(c.Latest is int l ? l.ToString(CultureInfo.InvariantCulture) : "none")}");
        output.WriteLine($"  layout: {m.Layout.Describe()}, order {m.Layout.Order}");
        output.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  model: {config.Layers} layers, {config.Experts} experts (top-{config.TopK}), hidden {config.HiddenSize}, FFN {config.IntermediateSize}, vocabulary {config.VocabSize}; weights in {m.ModelDtype}"));
        output.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  schedule: {m.Scheduler.Style}, lr {m.Scheduler.MaxLr:G4} → {m.Scheduler.MinLr:G4}, warm-up {m.Scheduler.WarmupSteps}, {m.Scheduler.DecaySteps} steps; lr at this step {m.Scheduler.LastLr:G4}"));
        output.WriteLine($"  optimizer: AdamW step {m.Optimizer.Step}{(m.Optimizer.Sharded ? ", sharded over data parallel" : "")}; data: next sample {m.Data.NextSample} of {m.Data.TrainSamples}, seed {m.Data.Seed}");
        output.WriteLine($"  files: {m.Files.Count} ({Mb(m.Files.Sum(f => f.Bytes))}): weights {Mb(weights)}, optimizer state {Mb(optimizer)}");
        var problems = CheckpointInspector.Verify(c);
        if (problems.Count > 0)
            throw new UserError($"{c.Folder} has {problems.Count} problem(s):{Environment.NewLine}  " + string.Join(Environment.NewLine + "  ", problems));
        output.WriteLine($"  integrity: ok — every rank file present with the size {MoeCheckpoint.MetadataFile} records; every weight and optimizer state covered exactly once");
        return 0;
    }

    /// <summary>Writes the checkpoint's weights as a Hugging Face folder.</summary>
    public static int Export(string path, string output, TextWriter log)
    {
        CheckpointInspector.Export(path, output, log);
        return 0;
    }

    private static long Bytes(CheckpointMetadata m, Func<TensorBlock, bool> which) =>
        m.Tensors.Where(which).Sum(b => (b.End - b.Start) * (b.Dtype switch { "F32" => 4L, "BF16" or "F16" => 2L, _ => 8L }));
}
