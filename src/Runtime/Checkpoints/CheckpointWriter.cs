using Moe.Dsl.Layout;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using Moe.Dsl;
using Moe.Runtime.Distributed;
using Moe.Runtime.Modeling;
using Moe.Runtime.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Checkpoints;

/// <summary>Where a save's files are created: the seam through which tests make a write fail (a disk that fills).</summary>
public class CheckpointStorage
{
    /// <summary>Files on the local file system.</summary>
    public static CheckpointStorage Default { get; } = new();

    /// <summary>Creates (or truncates) a file for writing.</summary>
    public virtual Stream Create(string path) => new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);
}

/// <summary>What a completed save wrote.</summary>
/// <param name="Folder">The iteration folder.</param>
/// <param name="Bytes">Bytes of all ranks' files.</param>
/// <param name="Seconds">Wall time of the save, barriers included.</param>
public sealed record SaveResult(string Folder, long Bytes, double Seconds);

/// <summary>
/// Saves a Moe checkpoint (<see cref="MoeCheckpoint"/>): collective over the world, every rank writing only what it
/// owns, atomically.
/// </summary>
/// <remarks>
/// <para>
/// What each rank writes: the weight blocks of its parameters under hub names — a block replicated over data
/// parallel (dense weights over dp × cp, experts over expert data parallel) by the first member of that group only,
/// and a parameter another rank also counts (a tensor-parallel duplicate) not at all — and its distributed-optimizer
/// slices: fp32 main parameters, exp_avg and exp_avg_sq of each parameter range it owns (unsharded: the group's first
/// member writes the whole state). Each tensor's block geometry goes into the file's <c>__metadata__</c>.
/// </para>
/// <para>
/// The protocol, with a collective agreement after each phase so that every rank knows when any rank failed:
/// (1) rank 0 makes SAVE/.iter_N.incomplete (removing what an interrupted save left); (2) every rank writes and
/// fsyncs its file there; (3) rank 0 reads the files' block lists, writes metadata.json, fsyncs it and the folder,
/// renames the folder to iter_N (an older iter_N — a reused save folder — is moved aside first and removed after),
/// fsyncs SAVE, and only then replaces latest_checkpointed_iteration.txt (temporary file, fsync, rename, fsync), then
/// applies retention. A crash at any point leaves the pointer on the previous complete checkpoint. A write that fails
/// (a full disk) removes the temporary folder and stops the run with a message naming what stays intact.
/// </para>
/// <para>
/// <c>MOE_CHECKPOINT_SLOW_SAVE_MS</c> (tests only): sleep this long after each phase, so that a test can kill the
/// process inside a save deterministically.
/// </para>
/// </remarks>
public static class CheckpointWriter
{
    /// <summary>Environment knob for crash tests: milliseconds to sleep after each save phase.</summary>
    public const string SlowSaveVariable = "MOE_CHECKPOINT_SLOW_SAVE_MS";

    /// <summary>
    /// Saves the trainer's state after <paramref name="iteration"/> steps into <paramref name="saveFolder"/> (collective
    /// over the world). Rank 0 reports to <paramref name="log"/>. A failure is a <see cref="UserError"/> on every rank.
    /// </summary>
    public static SaveResult Save(Trainer trainer, string saveFolder, int iteration, TextWriter log, CheckpointStorage? storage = null)
    {
        storage ??= CheckpointStorage.Default;
        var world = trainer.Rank.Groups.World;
        bool lead = world.Rank == 0;
        string temp = Path.Combine(saveFolder, MoeCheckpoint.IncompleteFolder(iteration));
        string final = Path.Combine(saveFolder, MoeCheckpoint.IterationFolder(iteration));
        var watch = Stopwatch.StartNew();
        if (lead) log.WriteLine($"saving iteration {iteration} to {final}");
        using var noGrad = torch.no_grad();

        Agree(world, lead ? Attempt(world, () => Prepare(saveFolder, temp)) : null, saveFolder, iteration, lead, temp);
        Pause();
        Agree(world, Attempt(world, () => WriteRankFile(trainer, temp, storage)), saveFolder, iteration, lead, temp);
        Pause();
        long bytes = 0;
        Agree(world, lead ? Attempt(world, () => bytes = Finish(trainer, saveFolder, iteration, temp, final, storage, log)) : null, saveFolder, iteration, lead, temp);
        double seconds = watch.Elapsed.TotalSeconds;
        if (lead)
            log.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"saved {final} ({bytes / 1e6:F1} MB in {seconds:F2} s, {bytes / 1e9 / Math.Max(seconds, 1e-9):F2} GB/s)"));
        return new SaveResult(final, bytes, seconds);
    }

    /// <summary>Runs a phase's file work; an I/O failure becomes its message (other exceptions are bugs and propagate).</summary>
    private static string? Attempt(Communicator world, Action phase)
    {
        try
        {
            phase();
            return null;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return $"rank {world.GlobalRank}: {e.Message}";
        }
    }

    /// <summary>
    /// Collective: every rank learns the first failing rank's message (lengths all-gathered, the message broadcast), so
    /// all of them stop with the same error; rank 0 removes the temporary folder.
    /// </summary>
    private static void Agree(Communicator world, string? error, string saveFolder, int iteration, bool lead, string temp)
    {
        string? first = error;
        if (world.Size > 1)
        {
            var lengths = world.AllGatherScalars(error is null ? -1 : Encoding.UTF8.GetByteCount(error));
            int root = Array.FindIndex(lengths, l => l >= 0);
            if (root < 0) return;
            using var bytes = root == world.Rank
                ? torch.tensor(Encoding.UTF8.GetBytes(error!), dtype: ScalarType.Byte).to(world.DeviceForScalars)
                : torch.zeros(lengths[root], dtype: ScalarType.Byte, device: world.DeviceForScalars);
            world.Broadcast(bytes, root);
            first = Encoding.UTF8.GetString(bytes.cpu().data<byte>().ToArray());
        }
        if (first is null) return;
        if (lead)
        {
            try
            {
                if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                first += $" (and {temp} could not be removed: {e.Message})";
            }
        }
        throw new UserError($"Saving iteration {iteration} to {saveFolder} failed ({first}); nothing of this save was kept. {Previous(saveFolder)}");
    }

    private static string Previous(string saveFolder)
    {
        int? latest = null;
        try
        {
            latest = MoeCheckpoint.ReadPointer(saveFolder);
        }
        catch (UserError)
        {
        }
        string pointer = Path.Combine(saveFolder, MoeCheckpoint.PointerFile);
        return latest is int n && Directory.Exists(Path.Combine(saveFolder, MoeCheckpoint.IterationFolder(n)))
            ? $"The previous checkpoint {Path.Combine(saveFolder, MoeCheckpoint.IterationFolder(n))} is intact and {pointer} still names it: fix the cause (disk space, permissions) and resume with --load {saveFolder}."
            : $"{saveFolder} holds no earlier complete checkpoint: fix the cause (disk space, permissions) and start again.";
    }

    private static void Pause()
    {
        if (int.TryParse(Environment.GetEnvironmentVariable(SlowSaveVariable), NumberStyles.None, CultureInfo.InvariantCulture, out int ms) && ms > 0)
            Thread.Sleep(ms);
    }

    /// <summary>Phase 1 (rank 0): the temporary folder, empty; leftovers of interrupted saves and deletions removed.</summary>
    private static void Prepare(string saveFolder, string temp)
    {
        Directory.CreateDirectory(saveFolder);
        foreach (var stale in Directory.GetDirectories(saveFolder, ".iter_*"))
            if (stale.EndsWith(".incomplete", StringComparison.Ordinal) || stale.EndsWith(".deleting", StringComparison.Ordinal))
                Directory.Delete(stale, recursive: true);
        Directory.CreateDirectory(temp);
    }

    /// <summary>Phase 2 (every rank): this rank's weight blocks and optimizer slices, with their geometry.</summary>
    private static void WriteRankFile(Trainer trainer, string temp, CheckpointStorage storage)
    {
        using var scope = torch.NewDisposeScope();
        int rank = trainer.Rank.Groups.Rank;
        string file = MoeCheckpoint.RankFile(rank);
        var owner = new Dictionary<object, (GradientBuffer Buffer, BufferEntry Entry)>(ReferenceEqualityComparer.Instance);
        foreach (var b in trainer.Buffers)
            foreach (var e in b.Entries) owner[e.Parameter] = (b, e);
        var parameters = trainer.Parameters.ToDictionary(p => p.Name, StringComparer.Ordinal);
        var tensors = new List<PendingTensor>();
        var blocks = new List<TensorBlock>();
        string weightDtype = SafetensorsFile.DtypeName(trainer.Model.Dtype);
        foreach (var h in MixtralStateDictAdapter.HubTensors(trainer.Model))
        {
            var (buffer, entry) = owner[h.Parameter];
            if (buffer.Group.Rank != 0 || !entry.CountedInNorm || h.Duplicate) continue;   // a replica another rank writes
            var shape = h.BlockShape;   // in the hub tensor's layout (q/k/v: rows, not the grouped view)
            var geometry = h.Block ?? TensorShard.Whole(shape);
            var hub = h;
            tensors.Add(new PendingTensor(h.Key, trainer.Model.Dtype, shape, () => hub.Read(hub.Parameter)));
            blocks.Add(new TensorBlock(file, h.Key, TensorBlock.Weight, h.Key, weightDtype, geometry.GlobalShape, geometry.LocalShape, geometry.Offsets, 0, BlockRange.Volume(shape)));
        }
        foreach (var slice in trainer.Optimizer.StateSlices())
        {
            if (!trainer.Optimizer.WritesStateOf(slice.Buffer) || !slice.Entry.CountedInNorm) continue;
            // One block per piece of the parameter the slice covers (a q/k/v weight with replicated key-value heads has
            // two; its shared key/value piece is written by the group's first rank only).
            var parameter = parameters[slice.Entry.Name];
            foreach (var (i, piece, from, to) in parameter.BlocksWithin(slice.BlockStart, slice.Length))
            {
                if (piece.IsDuplicate) continue;
                string suffix = parameter.Pieces is null ? "" : $"#{i}";
                var states = new[] { slice.Main, slice.ExpAvg, slice.ExpAvgSq };
                for (int k = 0; k < states.Length; k++)
                {
                    string kind = TensorBlock.OptimizerKinds[k], name = $"optimizer.{kind}.{slice.Entry.Name}{suffix}";
                    var state = states[k].narrow(0, from - slice.BlockStart, to - from);
                    tensors.Add(new PendingTensor(name, ScalarType.Float32, [to - from], () => state));
                    blocks.Add(new TensorBlock(file, name, kind, slice.Entry.Name, "F32", piece.Block.GlobalShape, piece.Block.LocalShape, piece.Block.Offsets,
                        from - piece.Start, to - piece.Start));
                }
            }
        }
        var metadata = new Dictionary<string, string> { [MoeCheckpoint.BlocksKey] = JsonSerializer.Serialize(blocks, MoeCheckpoint.Json) };
        SafetensorsFile.Write(Path.Combine(temp, file), tensors, metadata, storage.Create);
    }

    /// <summary>Phase 3 (rank 0): metadata.json, the rename, the pointer, retention. Returns the bytes of all rank files.</summary>
    private static long Finish(Trainer trainer, string saveFolder, int iteration, string temp, string final, CheckpointStorage storage, TextWriter log)
    {
        var files = new List<CheckpointFile>();
        var tensors = new List<TensorBlock>();
        for (int r = 0; r < trainer.Rank.Groups.World.Size; r++)
        {
            string name = MoeCheckpoint.RankFile(r), path = Path.Combine(temp, name);
            if (!File.Exists(path)) throw new IOException($"rank {r}'s file {path} is missing after every rank reported it written");
            using var f = SafetensorsFile.Open(path);
            var blocks = f.Metadata.TryGetValue(MoeCheckpoint.BlocksKey, out var json)
                ? JsonSerializer.Deserialize<List<TensorBlock>>(json, MoeCheckpoint.Json)!
                : throw new IOException($"{path} lacks its block list");
            files.Add(new CheckpointFile(name, r, new FileInfo(path).Length));
            tensors.AddRange(blocks);
        }
        var metadata = Describe(trainer, iteration, files, tensors);
        WriteDurable(Path.Combine(temp, MoeCheckpoint.MetadataFile), JsonSerializer.SerializeToUtf8Bytes(metadata, MoeCheckpoint.Json), storage);
        SyncDirectory(temp);

        // The rename commits the folder; an older iter_N (a reused save folder) is moved aside first and removed after.
        string? replaced = null;
        if (Directory.Exists(final))
        {
            replaced = Path.Combine(saveFolder, "." + MoeCheckpoint.IterationFolder(iteration) + ".replaced");
            if (Directory.Exists(replaced)) Directory.Delete(replaced, recursive: true);
            Directory.Move(final, replaced);
        }
        Directory.Move(temp, final);
        SyncDirectory(saveFolder);
        if (replaced is not null)
        {
            Directory.Delete(replaced, recursive: true);
            log.WriteLine($"note: replaced an earlier {final} (a save folder reused by another run)");
        }
        Pause();

        // The pointer moves last.
        int? before = null;
        try
        {
            before = MoeCheckpoint.ReadPointer(saveFolder);
        }
        catch (UserError)
        {
        }
        string pointer = Path.Combine(saveFolder, MoeCheckpoint.PointerFile), pointerTemp = Path.Combine(saveFolder, "." + MoeCheckpoint.PointerFile + ".tmp");
        try
        {
            WriteDurable(pointerTemp, Encoding.ASCII.GetBytes(iteration.ToString(CultureInfo.InvariantCulture)), storage);
            File.Move(pointerTemp, pointer, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // The pointer still names the previous checkpoint: take the new folder away too, so nothing half-committed stays.
            File.Delete(pointerTemp);
            Directory.Move(final, temp);
            throw;
        }
        SyncDirectory(saveFolder);
        if (before > iteration)
            log.WriteLine($"note: {pointer} named iteration {before}, written by an earlier run into this save folder; it now names this run's {iteration}. " +
                $"The earlier run's newer iterations are kept (retention never deletes above the run's latest); load them explicitly by folder.");
        try
        {
            Retain(trainer.Settings.Checkpoint.KeepLast, saveFolder, iteration, log);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            log.WriteLine($"warning: the checkpoint is saved, but removing older ones (--keep-last) failed: {e.Message}");
        }
        return files.Sum(f => f.Bytes);
    }

    /// <summary>Keeps the newest <paramref name="keepLast"/> complete iterations up to <paramref name="iteration"/>; removes each older one by renaming it away first.</summary>
    private static void Retain(int? keepLast, string saveFolder, int iteration, TextWriter log)
    {
        if (keepLast is not int k) return;
        var older = MoeCheckpoint.CompleteIterations(saveFolder).Where(c => c.Iteration < iteration).OrderByDescending(c => c.Iteration).Skip(k - 1).ToList();
        foreach (var (n, path) in older)
        {
            string doomed = Path.Combine(saveFolder, "." + MoeCheckpoint.IterationFolder(n) + ".deleting");
            Directory.Move(path, doomed);
            Directory.Delete(doomed, recursive: true);
        }
        if (older.Count > 0) log.WriteLine($"removed {string.Join(", ", older.Select(o => MoeCheckpoint.IterationFolder(o.Iteration)))} (--keep-last {k})");
    }

    /// <summary>metadata.json's content for this run at <paramref name="iteration"/>.</summary>
    private static CheckpointMetadata Describe(Trainer trainer, int iteration, List<CheckpointFile> files, List<TensorBlock> tensors)
    {
        var s = trainer.Settings;
        var t = s.Training;
        var layout = trainer.Rank.Groups.Layout;
        var config = MixtralConfig.From(s.Model) with { BosTokenId = s.Model.BosTokenId, EosTokenId = s.Model.EosTokenId };
        string dtype = trainer.Model.Dtype == ScalarType.BFloat16 ? "bfloat16" : "float32";
        return new CheckpointMetadata
        {
            Iteration = iteration,
            ConsumedSamples = (long)iteration * t.GlobalBatchSize,
            SavedAt = DateTime.UtcNow.ToString("O", CultureInfo.InvariantCulture),
            Layout = new CheckpointLayout
            {
                Gpus = layout.World, Tensor = layout.Tensor, Pipeline = layout.Pipeline, Context = layout.Context, Expert = layout.Expert,
                ExpertTensor = layout.ExpertTensor, DataParallel = layout.DataParallel, ExpertDataParallel = layout.ExpertDataParallel,
                Order = RankLayout.OrderName(layout.Order), DistributedOptimizer = trainer.Optimizer.Sharded,
            },
            ModelDtype = dtype,
            ModelConfig = (System.Text.Json.Nodes.JsonObject)JsonSerializer.SerializeToNode(MixtralStateDictAdapter.HubConfig(config, dtype))!,
            Settings = SettingsSnapshot.Flatten(s),
            Scheduler = new SchedulerState
            {
                Style = t.Schedule.ToString().ToLowerInvariant(), MaxLr = t.LearningRate, MinLr = t.MinLearningRate, WarmupSteps = t.WarmupSteps,
                DecaySteps = t.Steps, NumSteps = iteration, LastLr = LearningRate.At(Math.Max(iteration, 1), t),
            },
            Optimizer = new OptimizerState
            {
                Step = trainer.Optimizer.Steps, Beta1 = t.AdamBeta1, Beta2 = t.AdamBeta2, Eps = t.AdamEps, WeightDecay = t.WeightDecay, ClipGrad = t.ClipGrad,
                Sharded = trainer.Optimizer.Sharded,
            },
            Data = new DataPosition
            {
                Prefix = s.Data.Prefix, Split = s.Data.Split, SequenceLength = s.Data.SequenceLength, GlobalBatchSize = t.GlobalBatchSize,
                TrainSamples = (long)t.Steps * t.GlobalBatchSize, Seed = t.Seed, NextSample = (long)iteration * t.GlobalBatchSize,
            },
            Rng = new RngState { Seed = t.Seed },
            Moe = new MoeState { LoadBalancing = s.Router.LoadBalancing.ToString() },
            Files = files,
            Tensors = tensors,
        };
    }

    /// <summary>Writes a small file through <paramref name="storage"/> and flushes it to disk.</summary>
    private static void WriteDurable(string path, byte[] content, CheckpointStorage storage)
    {
        using var stream = storage.Create(path);
        stream.Write(content);
        stream.Flush();
        if (stream is FileStream file) file.Flush(flushToDisk: true);
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int open([MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags);

    [DllImport("libc", SetLastError = true)]
    private static extern int fsync(int fd);

    [DllImport("libc", SetLastError = true)]
    private static extern int close(int fd);

    /// <summary>fsync of a directory, so that the renames and new names in it survive a power loss (Linux, macOS; no-op on Windows, where .NET cannot).</summary>
    private static void SyncDirectory(string path)
    {
        if (OperatingSystem.IsWindows()) return;
        int fd = open(path, 0 /* O_RDONLY */);
        if (fd < 0) throw new IOException($"cannot open {path} to flush it (errno {Marshal.GetLastPInvokeError()})");
        try
        {
            if (fsync(fd) != 0) throw new IOException($"fsync of {path} failed (errno {Marshal.GetLastPInvokeError()})");
        }
        finally
        {
            close(fd);
        }
    }
}
