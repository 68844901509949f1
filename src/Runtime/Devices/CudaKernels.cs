using System.Runtime.InteropServices;
using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Devices;

/// <summary>
/// CUDA C kernels of our own, compiled at first use with NVRTC (the runtime compiler every CUDA build of
/// PyTorch ships) for the device in use and launched through the CUDA driver API on the default stream,
/// where TorchSharp's libtorch runs its work, so they are ordered with it. A thin P/Invoke layer: no CUDA
/// package for .NET is available, and none is needed for a handful of entry points.
/// </summary>
/// <remarks>
/// <see cref="TryLoad"/> returns null with the reason when the driver or NVRTC is missing or the source does
/// not compile; callers then keep their ATen path. Tensors are passed by device pointer: they must be CUDA,
/// contiguous, and stay alive until the kernel has run in stream order (the caching allocator only reuses a
/// freed block for work queued after it on the same stream, so disposing right after the launch is safe).
/// </remarks>
public sealed class CudaKernels
{
    /// <summary>
    /// CUDA C helpers for bf16 kernels (no headers needed): bf16 bits ↔ fp32, and fp32 → bf16 rounding to
    /// nearest even as c10::BFloat16 does, so a kernel can reproduce ATen's rounding after every operation.
    /// </summary>
    public const string Bf16Helpers = """
        typedef unsigned int u32;
        typedef unsigned short u16;
        struct alignas(16) V8 { u32 w[4]; };   // 8 bf16 values
        __device__ __forceinline__ float lo(u32 w) { return __uint_as_float(w << 16); }
        __device__ __forceinline__ float hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
        __device__ __forceinline__ float f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
        // fp32 -> bf16 bits, round to nearest even (NaN stays NaN).
        __device__ __forceinline__ u32 bits(float f) {
            u32 u = __float_as_uint(f);
            if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
            return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        }
        __device__ __forceinline__ float bf(float f) { return __uint_as_float(bits(f) << 16); }
        __device__ __forceinline__ u32 pack(float a, float b) { return bits(a) | (bits(b) << 16); }

        """;

    /// <summary>False when MOE_FUSED_KERNELS=0: every caller keeps its ATen path.</summary>
    public static bool Enabled => Environment.GetEnvironmentVariable("MOE_FUSED_KERNELS") != "0";

    /// <summary><see cref="TryLoad"/>, or null after one line on stderr saying what is used instead and why.</summary>
    public static CudaKernels? LoadOrExplain(string source, string name, string fallback)
    {
        var kernels = TryLoad(source, name, out var why);
        if (kernels is null) Console.Error.WriteLine($"moe: the CUDA kernels of {name} are not available, so {fallback}: {why}");
        return kernels;
    }

    private readonly IntPtr _module;
    private readonly Dictionary<string, IntPtr> _functions = new();

    private CudaKernels(IntPtr module) => _module = module;

    /// <summary>The compiled module, or null with <paramref name="why"/> saying what was missing.</summary>
    public static CudaKernels? TryLoad(string source, string name, out string why)
    {
        try
        {
            if (Driver.cuCtxGetCurrent(out var ctx) != 0 || ctx == IntPtr.Zero)
            {
                why = "no CUDA context is current on this thread (run a CUDA tensor operation first)";
                return null;
            }
            Check(Driver.cuCtxGetDevice(out int device), "cuCtxGetDevice");
            Check(Driver.cuDeviceGetAttribute(out int major, 75, device), "cuDeviceGetAttribute");
            Check(Driver.cuDeviceGetAttribute(out int minor, 76, device), "cuDeviceGetAttribute");
            if (!Nvrtc.TryCompile(source, name, $"sm_{major}{minor}", out var cubin, out why)) return null;
            IntPtr module;
            unsafe
            {
                fixed (byte* image = cubin)
                    Check(Driver.cuModuleLoadData(out module, (IntPtr)image), "cuModuleLoadData");
            }
            why = "";
            return new CudaKernels(module);
        }
        catch (DllNotFoundException e)
        {
            why = $"the CUDA driver library is not loadable ({e.Message})";
            return null;
        }
        catch (InvalidOperationException e)
        {
            why = e.Message;
            return null;
        }
    }

    /// <summary>Launches <paramref name="kernel"/> on the default stream with 1-D blocks; arguments are pointers or 64-bit integers.</summary>
    public unsafe void Launch(string kernel, long threads, int blockSize, params object[] args)
    {
        if (threads <= 0) return;
        IntPtr fn;
        lock (_functions)
        {
            if (!_functions.TryGetValue(kernel, out fn))
            {
                Check(Driver.cuModuleGetFunction(out fn, _module, kernel), $"cuModuleGetFunction({kernel})");
                _functions[kernel] = fn;
            }
        }
        long blocks = (threads + blockSize - 1) / blockSize;
        if (blocks > int.MaxValue) throw new InvalidOperationException($"{kernel}: {threads} threads is more than one launch covers.");
        var values = stackalloc long[args.Length];
        var pointers = stackalloc IntPtr[args.Length];
        for (int i = 0; i < args.Length; i++)
        {
            values[i] = args[i] switch
            {
                Tensor t => (long)DataPointer(t),
                long l => l,
                int n => n,
                _ => throw new ArgumentException($"{kernel}: argument {i} is a {args[i].GetType().Name}; pass tensors or integers."),
            };
            pointers[i] = (IntPtr)(values + i);
        }
        Check(Driver.cuLaunchKernel(fn, (uint)blocks, 1, 1, (uint)blockSize, 1, 1, 0, IntPtr.Zero, (IntPtr)pointers, IntPtr.Zero), $"cuLaunchKernel({kernel})");
    }

    /// <summary>The device address of a contiguous CUDA tensor's first element.</summary>
    public static IntPtr DataPointer(Tensor t)
    {
        if (t.device_type != DeviceType.CUDA || !t.is_contiguous())
            throw new ArgumentException("CUDA kernels take contiguous CUDA tensors.");
        var p = THSTensor_data(t.Handle);
        if (p == IntPtr.Zero) throw new InvalidOperationException("libtorch returned no data pointer for a CUDA tensor.");
        return p;
    }

    // TorchSharp's internal C ABI (LibTorchSharp THSTensor.cpp): tensor->data_ptr(). Not public API: re-check on upgrades.
    [DllImport("LibTorchSharp")]
    private static extern IntPtr THSTensor_data(IntPtr handle);

    private static void Check(int status, string call)
    {
        if (status == 0) return;
        Driver.cuGetErrorName(status, out var namePtr);
        string name = namePtr == IntPtr.Zero ? status.ToString() : Marshal.PtrToStringAnsi(namePtr)!;
        throw new InvalidOperationException($"{call} failed: {name}");
    }

    private static class Driver
    {
        private const string Lib = "libcuda.so.1";
        [DllImport(Lib)] public static extern int cuCtxGetCurrent(out IntPtr ctx);
        [DllImport(Lib)] public static extern int cuCtxGetDevice(out int device);
        [DllImport(Lib)] public static extern int cuDeviceGetAttribute(out int value, int attribute, int device);
        [DllImport(Lib)] public static extern int cuModuleLoadData(out IntPtr module, IntPtr image);
        [DllImport(Lib)] public static extern int cuModuleGetFunction(out IntPtr function, IntPtr module, [MarshalAs(UnmanagedType.LPStr)] string name);
        [DllImport(Lib)] public static extern int cuLaunchKernel(IntPtr f, uint gridX, uint gridY, uint gridZ, uint blockX, uint blockY, uint blockZ,
            uint sharedBytes, IntPtr stream, IntPtr kernelParams, IntPtr extra);
        [DllImport(Lib)] public static extern int cuGetErrorName(int status, out IntPtr name);
    }

    /// <summary>NVRTC, found beside the libtorch in use (PyTorch's wheels keep it under site-packages/nvidia).</summary>
    private static class Nvrtc
    {
        private delegate int CreateProgram(out IntPtr prog, IntPtr src, IntPtr name, int headers, IntPtr h, IntPtr n);
        private delegate int CompileProgram(IntPtr prog, int count, IntPtr[] options);
        private delegate int GetSize(IntPtr prog, out nuint size);
        private delegate int GetBytes(IntPtr prog, byte[] buffer);
        private delegate int DestroyProgram(ref IntPtr prog);

        public static bool TryCompile(string source, string name, string arch, out byte[] cubin, out string why)
        {
            cubin = [];
            var lib = Load(out why);
            if (lib == IntPtr.Zero) return false;
            T Fn<T>(string export) => Marshal.GetDelegateForFunctionPointer<T>(NativeLibrary.GetExport(lib, export));
            var src = Marshal.StringToHGlobalAnsi(source);
            var progName = Marshal.StringToHGlobalAnsi(name);
            string[] optionText = [$"--gpu-architecture={arch}", "--std=c++17"];
            var options = optionText.Select(Marshal.StringToHGlobalAnsi).ToArray();
            IntPtr prog = IntPtr.Zero;
            try
            {
                if (Fn<CreateProgram>("nvrtcCreateProgram")(out prog, src, progName, 0, IntPtr.Zero, IntPtr.Zero) != 0)
                {
                    why = "nvrtcCreateProgram failed";
                    return false;
                }
                int status = Fn<CompileProgram>("nvrtcCompileProgram")(prog, options.Length, options);
                if (status != 0)
                {
                    Fn<GetSize>("nvrtcGetProgramLogSize")(prog, out var logSize);
                    var log = new byte[(int)logSize];
                    Fn<GetBytes>("nvrtcGetProgramLog")(prog, log);
                    why = $"NVRTC could not compile {name} for {arch} (status {status}): {Encoding.ASCII.GetString(log).TrimEnd('\0', '\n')}";
                    return false;
                }
                Fn<GetSize>("nvrtcGetCUBINSize")(prog, out var size);
                cubin = new byte[(int)size];
                Fn<GetBytes>("nvrtcGetCUBIN")(prog, cubin);
                return true;
            }
            finally
            {
                if (prog != IntPtr.Zero) Fn<DestroyProgram>("nvrtcDestroyProgram")(ref prog);
                Marshal.FreeHGlobal(src);
                Marshal.FreeHGlobal(progName);
                foreach (var o in options) Marshal.FreeHGlobal(o);
            }
        }

        private static IntPtr Load(out string why)
        {
            var tried = new List<string>();
            foreach (var candidate in Candidates())
            {
                tried.Add(candidate);
                if (NativeLibrary.TryLoad(candidate, out var lib)) { why = ""; return lib; }
            }
            why = "NVRTC (libnvrtc) was not found; tried " + string.Join(", ", tried);
            return IntPtr.Zero;
        }

        private static IEnumerable<string> Candidates()
        {
            // Already mapped into the process (libtorch loads it for its own fused kernels)?
            string[] maps = File.Exists("/proc/self/maps") ? File.ReadAllLines("/proc/self/maps") : [];
            string? Mapped(string fragment) => maps.Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries)).Where(f => f.Length >= 6)
                .Select(f => f[^1]).FirstOrDefault(p => Path.GetFileName(p).StartsWith(fragment, StringComparison.Ordinal));
            if (Mapped("libnvrtc.so") is string loaded) yield return loaded;
            foreach (var soname in new[] { "libnvrtc.so.13", "libnvrtc.so.12" }) yield return soname;
            if (Mapped("libtorch_cuda.so") is string torchCuda)
            {
                string torchLib = Path.GetDirectoryName(torchCuda)!;
                string sitePackages = Path.GetFullPath(Path.Combine(torchLib, "..", ".."));
                var dirs = new List<string> { torchLib };
                string nvidia = Path.Combine(sitePackages, "nvidia");
                if (Directory.Exists(nvidia)) dirs.AddRange(Directory.GetDirectories(nvidia).Select(d => Path.Combine(d, "lib")).Where(Directory.Exists));
                foreach (var dir in dirs)
                    foreach (var file in Directory.GetFiles(dir, "libnvrtc.so*").Where(f => !f.Contains("builtins")).OrderByDescending(f => f, StringComparer.Ordinal))
                        yield return file;
            }
        }
    }
}
