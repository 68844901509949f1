using System.Runtime.InteropServices;
using Moe.Runtime.Checkpoints;
using Moe.Tests;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>Zero-copy tensors over the memory-mapped safetensors bytes (TorchSharp's internal THSTensor_new).</summary>
public class SafetensorsMapTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-map-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [DllImport("LibTorchSharp")]
    private static extern IntPtr THSTensor_data(IntPtr handle);

    [Fact]
    public void Map_EqualsRead_ForEveryTensorOfTheFixture()
    {
        using var f = SafetensorsFile.Open(TestPaths.Fixture("mixtral-tiny", "model.safetensors"));
        foreach (var key in f.Entries.Keys)
        {
            using var mapped = f.Map(key);
            using var read = f.Read(key);
            Assert.Equal(read.shape, mapped.shape);
            Assert.True(read.Equals(mapped), key);
        }
    }

    [Fact]
    public void Map_AliasesTheFileBytes_InEveryDtype()
    {
        string path = Path.Combine(_dir, "m.safetensors");
        SafetensorsFile.Write(path,
        [
            new("bf16", torch.tensor(new float[] { 1.5f, -2, 1e-3f, 65504 }).to(ScalarType.BFloat16).view(2, 2)),
            new("i64", torch.tensor(new long[] { long.MinValue, 0, 7 })),
            new("f32", torch.tensor(new float[] { 3.25f })),
        ]);
        using var f = SafetensorsFile.Open(path);
        foreach (var key in new[] { "bf16", "i64", "f32" })
        {
            using var a = f.Map(key);
            using var b = f.Map(key);
            Assert.True(f.Read(key).Equals(a), key);
            // Two maps of one tensor point at the same bytes: nothing was copied.
            Assert.Equal(THSTensor_data(a.Handle), THSTensor_data(b.Handle));
        }
    }
}
