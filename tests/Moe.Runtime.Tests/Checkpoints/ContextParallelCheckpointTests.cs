using Moe.Dsl;
using Xunit;
using static Moe.Runtime.Tests.Checkpoints.Resume;

namespace Moe.Runtime.Tests.Checkpoints;

/// <summary>
/// Checkpoints do not depend on context parallelism: the cp ranks hold the same weights (dense gradients are reduced
/// and the optimizer sharded over data × context parallel), so a checkpoint saved at CP 2 loads on one device with
/// every weight and optimizer element as saved, and training continues with the uninterrupted one-device losses.
/// </summary>
[Collection("Console")]
public class ContextParallelCheckpointTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-cp-checkpoint-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void SavedAtContextParallel2_LoadsOnOneDevice_StateEqualAndLossesContinue()
    {
        var uninterrupted = Run(Tiny(Layout(1), steps: 8)).Single();
        var saved = Run(Tiny(new Parallelism { Gpus = 2, Context = 2 }, steps: 8), save: _dir, stopAfter: 4);
        var resumed = Run(Tiny(Layout(1), steps: 8), load: _dir).Single();

        var before = WholeState(saved.Select(r => r.AtEnd), "saved at CP 2");
        var after = WholeState([resumed.AtStart], "restored on one device");
        string[] what = ["weights", "main parameters", "exp_avg", "exp_avg_sq"];
        for (int k = 0; k < before.Length; k++) AssertBitEqual(before[k], after[k], $"CP 2 → 1: {what[k]}");

        Assert.Equal(Enumerable.Range(5, 4), resumed.Steps.Select(m => m.Step));
        foreach (var (m, e) in resumed.Steps.Zip(uninterrupted.Steps[4..]))
            Assert.True(Math.Abs(m.Loss - e.Loss) <= 1e-5 * Math.Abs(e.Loss), $"step {m.Step}: loss {m.Loss:R}, uninterrupted one device {e.Loss:R}");
    }
}
