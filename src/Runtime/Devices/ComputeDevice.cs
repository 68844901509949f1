using System.Diagnostics;
using Moe.Runtime.Commands;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Devices;

/// <summary>
/// The one place that turns --device / --dtype into a TorchSharp device and dtype. TorchSharp's CUDA
/// packages are not served here, so CUDA comes from an installed PyTorch's libtorch (torch/lib): the
/// process must start with that directory on the loader path and without the CPU libtorch beside it
/// (what gpu-bundle's `run` script does). When CUDA is asked for and absent, the error says exactly what
/// was looked for.
/// </summary>
public static class ComputeDevice
{
    public static Device Resolve(string device)
    {
        switch (device)
        {
            case "cpu":
                return CPU;
            case "cuda":
                CudaAllocator.ConfigureDefaults();
                if (torch.cuda.is_available()) return CUDA;
                throw new UserError(CudaMissingMessage());
            default:
                throw new UserError($"--device {device} is not known; use cpu or cuda.");
        }
    }

    public static ScalarType ResolveDtype(string dtype) => dtype switch
    {
        "float32" or "fp32" => ScalarType.Float32,
        "bfloat16" or "bf16" => ScalarType.BFloat16,
        _ => throw new UserError($"--dtype {dtype} is not known; use float32 or bfloat16."),
    };

    /// <summary>Where the CUDA libtorch of an installed PyTorch is: MOE_TORCH_LIB, else python3's torch/lib.</summary>
    public static (string? Directory, string How) FindTorchLib()
    {
        string? env = Environment.GetEnvironmentVariable("MOE_TORCH_LIB");
        if (!string.IsNullOrEmpty(env)) return (Directory.Exists(env) ? env : null, $"MOE_TORCH_LIB={env}" + (Directory.Exists(env) ? "" : " (no such directory)"));
        var (dir, how) = FromPython();
        return (dir, "MOE_TORCH_LIB is unset, so python's torch/lib was tried: " + how);
    }

    private static (string? Directory, string How) FromPython()
    {
        string python = Environment.GetEnvironmentVariable("PYTHON") ?? "python3";
        try
        {
            var psi = new ProcessStartInfo(python, "-c \"import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib')); print(torch.version.cuda)\"")
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
            };
            using var p = Process.Start(psi)!;
            string[] lines = p.StandardOutput.ReadToEnd().Split('\n', StringSplitOptions.RemoveEmptyEntries);
            p.WaitForExit(20_000);
            if (p.ExitCode != 0 || lines.Length < 2) return (null, $"`{python} -c 'import torch'` failed (no PyTorch installed for {python})");
            if (lines[1] == "None") return (null, $"{python}'s PyTorch at {lines[0]} is a CPU build (torch.version.cuda is None)");
            return (lines[0], $"{python}'s PyTorch (CUDA {lines[1]}) at {lines[0]}");
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return (null, $"{python} is not on PATH");
        }
    }

    private static string CudaMissingMessage()
    {
        var (dir, how) = FindTorchLib();
        string ld = Environment.GetEnvironmentVariable("LD_LIBRARY_PATH") ?? "(unset)";
        string found = dir is null
            ? $"No CUDA libtorch was found: {how}. Install PyTorch with CUDA, or set MOE_TORCH_LIB to its torch/lib directory."
            : $"A CUDA libtorch exists ({how}), but this process loaded the CPU libtorch that ships beside it. " +
              "Start Moe through a GPU bundle (`dotnet publish <project> -c Release -r linux-x64 -p:MoeGpuBundle=true` makes one: it leaves the CPU libtorch out and its `run` script puts " +
              $"{dir} on LD_LIBRARY_PATH), or publish without the libtorch-cpu natives and run with LD_LIBRARY_PATH={dir}.";
        return $"--device cuda was asked for, but TorchSharp sees no CUDA device (torch.cuda.is_available() is false; LD_LIBRARY_PATH={ld}). {found}";
    }
}
