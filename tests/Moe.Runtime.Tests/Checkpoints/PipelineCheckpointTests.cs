using Moe.Dsl;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using Moe.Tests;
using Xunit;
using static TorchSharp.torch;
using static Moe.Runtime.Tests.Checkpoints.Resume;

namespace Moe.Runtime.Tests.Checkpoints;

/// <summary>
/// Checkpoints across pipeline layouts: each stage writes its own layers under the model's layer numbers, so a
/// checkpoint saved with two stages loads on one and the reverse, restoring every weight and optimizer state bit for bit.
/// </summary>
[Collection("Console")]
public sealed class PipelineCheckpointTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "moe-pp-ckpt-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    [Theory]
    [InlineData(2, 1)]   // PP 2 → one device
    [InlineData(1, 2)]   // one device → PP 2
    public void SavedAtOnePipelineSize_LoadsAtAnother_WithTheSameState(int fromPp, int toPp)
    {
        var saved = Run(Tiny(new Parallelism { Gpus = fromPp, Pipeline = fromPp }, steps: 3), save: _dir, stopAfter: 2);
        var resumed = Run(Tiny(new Parallelism { Gpus = toPp, Pipeline = toPp }, steps: 3), load: _dir);

        var before = WholeState(saved.Select(r => r.AtEnd), "saved");
        var after = WholeState(resumed.Select(r => r.AtStart), "restored");
        string[] what = ["weights", "main parameters", "exp_avg", "exp_avg_sq"];
        for (int k = 0; k < before.Length; k++) AssertBitEqual(before[k], after[k], $"PP {fromPp} → PP {toPp}: {what[k]}");
        Assert.All(resumed, r => Assert.Equal([3], r.Steps.Select(m => m.Step)));
    }

    [Fact]
    public void HuggingFaceCheckpoint_LoadsIntoEachStageItsOwnTensors()
    {
        string dir = TestPaths.Fixture("mixtral-tiny");
        var config = MixtralStateDictAdapter.ReadConfig(dir);
        var options = new MoeOptions { TopK = config.TopK };
        using var whole = new MixtralModel(config, options, ScalarType.Float32, CPU);
        MixtralStateDictAdapter.Load(whole, dir);
        var expected = whole.ParametersInForwardOrder().ToDictionary(p => p.Name, p => p.Parameter);
        var seen = new List<string>();
        for (int stage = 0; stage < 2; stage++)
        {
            using var model = new MixtralModel(config, options, ScalarType.Float32, CPU, stage: PipelineStage.Of(new Parallelism { Gpus = 2, Pipeline = 2 }, config.Layers, stage));
            MixtralStateDictAdapter.Load(model, dir);   // the other stage's layers in the file are not "unexpected"
            foreach (var p in model.ParametersInForwardOrder())
            {
                Assert.True(p.Parameter.Equals(expected[p.Name]), $"stage {stage}: {p.Name}");
                seen.Add(p.Name);
            }
        }
        Assert.Equal(expected.Keys.Order(), seen.Order());
    }
}
