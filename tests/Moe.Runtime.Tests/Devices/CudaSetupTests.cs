using System.Runtime.InteropServices;
using Moe.Runtime.Devices;
using Moe.Runtime.MixtureOfExperts;
using Moe.Runtime.Modeling;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests.Devices;

/// <summary>What the CUDA set-up does on a machine without CUDA, and the allocator default.</summary>
[Collection("Environment")]
public class CudaSetupTests
{
    [DllImport("libc", EntryPoint = "getenv")]
    private static extern IntPtr GetEnv([MarshalAs(UnmanagedType.LPUTF8Str)] string name);

    private static string? NativeEnv(string name) => Marshal.PtrToStringUTF8(GetEnv(name));

    [Fact]
    public void AllocatorDefault_ReachesTheNativeEnvironment_AndAUserSettingWins()
    {
        string? before = Environment.GetEnvironmentVariable(CudaAllocator.Variable);
        try
        {
            Environment.SetEnvironmentVariable(CudaAllocator.Variable, "garbage_collection_threshold:0.6");
            Assert.Equal("garbage_collection_threshold:0.6", CudaAllocator.ConfigureDefaults());

            Environment.SetEnvironmentVariable(CudaAllocator.Variable, null);
            if (Environment.GetEnvironmentVariable("PYTORCH_ALLOC_CONF") is null)
            {
                Assert.Equal(CudaAllocator.Default, CudaAllocator.ConfigureDefaults());
                // libtorch reads the C library's environment, which .NET's SetEnvironmentVariable does not change.
                Assert.Equal(CudaAllocator.Default, NativeEnv(CudaAllocator.Variable));
            }
        }
        finally
        {
            Environment.SetEnvironmentVariable(CudaAllocator.Variable, before);
        }
    }

    [Fact]
    public void KernelPaths_AreNotTakenOffCuda()
    {
        var qkv = torch.zeros(1, 4, 48, dtype: ScalarType.BFloat16);
        Assert.False(RotaryQkv.Applies(qkv, torch.zeros(1, 1, 4, 16, dtype: ScalarType.BFloat16), 16));
        Assert.False(SwiGluKernels.Applies(torch.zeros(4, 8, dtype: ScalarType.BFloat16), 16));
    }

    [Fact]
    public void HandedBackGradientHandles_AreReleasedTogether()
    {
        using var scope = torch.NewDisposeScope();
        var a = ManagedBackward.Keep(torch.ones(3));
        var b = ManagedBackward.Keep(torch.ones(2));
        Assert.False(a.IsInvalid);
        ManagedBackward.Release();
        Assert.True(a.IsInvalid);
        Assert.True(b.IsInvalid);
    }

    [Fact]
    public void CudaKernels_WithoutACudaDriverOrContext_SayWhyInsteadOfThrowing()
    {
        var kernels = CudaKernels.TryLoad("extern \"C\" __global__ void k() {}", "k.cu", out var why);
        if (kernels is not null) Assert.Skip("this host has a CUDA driver and a current context: the kernels loaded, so there is no reason to check");
        Assert.False(string.IsNullOrWhiteSpace(why));
        Assert.True(why.Contains("CUDA"), why);
    }
}
