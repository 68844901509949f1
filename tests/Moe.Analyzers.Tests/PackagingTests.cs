using System.Diagnostics;
using System.IO.Compression;
using System.Text.RegularExpressions;
using Xunit;

namespace Moe.Analyzers.Tests;

/// <summary>
/// Tests that start dotnet builds of the repository's projects run one at a time: two MSBuild processes writing
/// the same obj/ folders would race.
/// </summary>
[CollectionDefinition("dotnet builds", DisableParallelization = true)]
public sealed class DotnetBuildsCollection;

/// <summary>
/// Issue 16's first minutes of a user: the packages packed into a temporary feed, the template installed, a recipe
/// created outside the repository and restored with an empty package folder (our packages can only come from the
/// feed; TorchSharp and the rest from the usual sources), built clean, run (the plan), and broken to see the
/// MOE error fail the build exactly as in the repository.
/// </summary>
[Collection("dotnet builds")]
public class TemplateEndToEndTests : IDisposable
{
    private readonly string _root = Directory.CreateTempSubdirectory("moe-template-").FullName;

    public void Dispose() => Directory.Delete(_root, recursive: true);

    private static string Version =>
        Regex.Match(File.ReadAllText(Path.Combine(Moe.Tests.TestPaths.RepoRoot, "Directory.Build.props")), "<Version>([^<]+)</Version>").Groups[1].Value;

    private static HashSet<string> Entries(string package)
    {
        using var zip = ZipFile.OpenRead(package);
        return zip.Entries.Select(e => e.FullName).ToHashSet();
    }

    private static string Nuspec(string package)
    {
        using var zip = ZipFile.OpenRead(package);
        using var reader = new StreamReader(zip.Entries.Single(e => e.FullName.EndsWith(".nuspec", StringComparison.Ordinal)).Open());
        return reader.ReadToEnd();
    }

    [Fact]
    public void PackedTemplate_CreatesARecipeOutsideTheRepository_ThatBuildsRunsAndFailsOnAnInvalidLayout()
    {
        string repo = Moe.Tests.TestPaths.RepoRoot;
        string feed = Path.Combine(_root, "feed"), packages = Path.Combine(_root, "packages"), hive = Path.Combine(_root, "hive");
        string work = Path.Combine(_root, "work");
        Directory.CreateDirectory(work);

        // 1. The three packages a recipe needs (the moe tool is packed by `dotnet pack Dsl.sln`; it is not needed here).
        File.WriteAllText(Path.Combine(_root, "pack.slnx"),
            "<Solution>\n" + string.Join("", new[] { "src/Dsl/Moe.Dsl.csproj", "src/Runtime/Moe.Runtime.csproj", "templates/Moe.Templates.csproj" }
                .Select(p => $"  <Project Path=\"{Path.Combine(repo, p)}\" />\n")) + "</Solution>\n");
        // Debug: the configuration the test run has just built, so packing compiles nothing again.
        Run(_root, null, $"pack pack.slnx -c Debug -o \"{feed}\" -nologo -v q");
        string version = Version;
        string dsl = Path.Combine(feed, $"Moe.Dsl.{version}.nupkg"), runtime = Path.Combine(feed, $"Moe.Runtime.{version}.nupkg");
        string templates = Path.Combine(feed, $"Moe.Templates.{version}.nupkg");

        var dslEntries = Entries(dsl);
        Assert.Contains("lib/netstandard2.0/Moe.Dsl.dll", dslEntries);
        foreach (var dll in new[] { "Moe.Analyzers.dll", "Moe.Analyzers.CodeFixes.dll", "Moe.Generators.dll", "Moe.Dsl.dll", "Scriban.Signed.dll" })
            Assert.Contains("analyzers/dotnet/cs/" + dll, dslEntries);
        var runtimeEntries = Entries(runtime);
        Assert.Contains("lib/net10.0/Moe.Runtime.dll", runtimeEntries);
        foreach (var file in new[] { "Moe.Runtime.props", "Moe.Runtime.targets", "LibTorchSharpLoad.targets", "WeakenElfVersionNeed.cs", "GpuBundle.props", "GpuBundle.targets", "GpuBundleRun.sh" })
            Assert.Contains("buildTransitive/" + file, runtimeEntries);
        string nuspec = Nuspec(runtime);
        Assert.Matches("<dependency id=\"TorchSharp\" version=\"0.107.0\"", nuspec);
        Assert.Matches("<dependency id=\"libtorch-cpu-linux-x64\" version=\"2.10.0\"", nuspec);
        // Moe.Dsl with its analyzers: a project that references only Moe.Runtime is checked too.
        Assert.Matches($"<dependency id=\"Moe.Dsl\" version=\"{Regex.Escape(version)}\" include=\"All\" />", nuspec);
        Assert.Contains("content/moe-recipe/.template.config/template.json", Entries(templates));

        // 2. The feed the user names in nuget.config (beside the usual sources), and the template.
        File.WriteAllText(Path.Combine(work, "nuget.config"),
            $"<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<configuration>\n  <packageSources>\n    <add key=\"moe-local\" value=\"{feed}\" />\n  </packageSources>\n</configuration>\n");
        Run(work, packages, $"new install \"{templates}\" --debug:custom-hive \"{hive}\"");
        Run(work, packages, $"new moe-recipe -n MyRecipe --debug:custom-hive \"{hive}\"");
        Run(work, packages, $"new moe-recipe -n TinyOne --model tiny --gpus 1 --debug:custom-hive \"{hive}\"");
        string tiny = File.ReadAllText(Path.Combine(work, "TinyOne", "TinyOne.cs"));
        Assert.Contains("public sealed partial class TinyOne : Recipe", tiny);
        Assert.Contains("Model.TinyMixtral", tiny);
        Assert.Contains("new() { Gpus = 1 }", tiny);
        Assert.DoesNotContain("#if", tiny);

        string project = Path.Combine(work, "MyRecipe");
        string source = Path.Combine(project, "MyRecipe.cs");
        string recipe = File.ReadAllText(source);
        Assert.Contains("Gpus = 32,", recipe);
        Assert.Contains($"Include=\"Moe.Runtime\" Version=\"{version}\"", File.ReadAllText(Path.Combine(project, "MyRecipe.csproj")));

        // 3. Restore into an empty package folder, build clean, run: the plan.
        string output = Run(project, packages, "build -nologo -v q");
        Assert.Contains("0 Warning(s)", output);
        Assert.DoesNotContain(": warning ", output);
        string restored = File.ReadAllText(Path.Combine(packages, "moe.runtime", version, ".nupkg.metadata"));
        Assert.Contains(feed.Replace("\\", "\\\\"), restored); // from the temporary feed, nowhere else
        output = Run(project, packages, "run --no-build");
        Assert.StartsWith("Plan for MyRecipe: Mixtral 8x7B, 46,702,792,704 parameters", output);
        Assert.Contains("data parallel             8 = 32 / (1·4·1)", output);
        Assert.Contains("of H100's 80 GB: fits", output);

        // 4. An invalid layout fails the build with the MOE error, as in the repository.
        File.WriteAllText(source, recipe.Replace("Expert = 8,", "Expert = 3,"));
        var (exit, broken) = Dotnet(project, packages, "build -nologo -v q");
        Assert.NotEqual(0, exit);
        Assert.Contains("error MOE0003", broken);
        Assert.Contains("Expert (3) must divide the 8 experts of Mixtral 8x7B; valid: 1, 2, 4, 8", broken);
        Assert.DoesNotContain("CS5001", broken); // the generator's fallback keeps the missing Main out of the way

        // 5. A plan that does not fit its GPU is a warning, and an error where the user asks for it.
        File.WriteAllText(source, recipe.Replace("Gpu = Gpu.H100,", "Gpu = Gpu.A100_40,"));
        (exit, output) = Dotnet(project, packages, "build -nologo -v q");
        Assert.True(exit == 0, output);
        Assert.Contains("warning MOE0301", output);
        File.WriteAllText(Path.Combine(project, ".editorconfig"), "root = true\n\n[*.cs]\ndotnet_diagnostic.MOE0301.severity = error\n");
        (exit, output) = Dotnet(project, packages, "build -nologo -v q");
        Assert.NotEqual(0, exit);
        Assert.Contains("error MOE0301", output);
    }

    private static string Run(string dir, string? packages, string arguments)
    {
        var (exit, output) = Dotnet(dir, packages, arguments);
        Assert.True(exit == 0, $"dotnet {arguments} exited with {exit}:\n{output}");
        return output;
    }

    /// <summary>The dotnet CLI in <paramref name="dir"/>; with <paramref name="packages"/>, restoring into that folder.</summary>
    private static (int Exit, string Output) Dotnet(string dir, string? packages, string arguments)
    {
        var psi = new ProcessStartInfo("dotnet", arguments)
        {
            WorkingDirectory = dir,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        if (packages is not null) psi.Environment["NUGET_PACKAGES"] = packages;
        psi.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        psi.Environment["DOTNET_NOLOGO"] = "1";
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(600_000))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"dotnet {arguments} took more than 10 minutes");
        }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }
}

/// <summary>
/// The GPU bundle on a CPU host: what can be checked without a GPU — the folder (self-contained, no CPU libtorch),
/// the archive, the run script, and that the script starts the recipe against a libtorch it is pointed at (here the
/// CPU libtorch of the NuGet package folder standing in for a host PyTorch's torch/lib).
/// </summary>
[Collection("dotnet builds")]
public class GpuBundleTests : IDisposable
{
    private readonly string _root = Directory.CreateTempSubdirectory("moe-bundle-").FullName;

    public void Dispose() => Directory.Delete(_root, recursive: true);

    [Fact]
    [System.Runtime.Versioning.SupportedOSPlatform("linux")]
    public void GpuBundle_IsSelfContainedWithoutCpuLibTorch_AndItsRunScriptStartsTheRecipe()
    {
        Assert.SkipUnless(OperatingSystem.IsLinux() && System.Runtime.InteropServices.RuntimeInformation.OSArchitecture == System.Runtime.InteropServices.Architecture.X64,
            "The GPU bundle is published for Linux x64 hosts and its run script is bash.");
        string repo = Moe.Tests.TestPaths.RepoRoot;
        string bundle = Path.Combine(_root, "TinyMixtral");
        // gz: xz (the default) takes about 100 s of CPU for this folder, gzip 6 s; the rest is the same code.
        var (exit, output) = EndToEndBuildTests.Dotnet(
            $"publish recipes/TinyMixtral/TinyMixtral.csproj -r linux-x64 -p:MoeGpuBundle=true -p:MoeGpuBundleCompression=gz -o \"{bundle}\" -nologo -v q", repo);
        Assert.True(exit == 0, output);

        var files = Directory.GetFiles(bundle, "*", SearchOption.AllDirectories).Select(f => Path.GetRelativePath(bundle, f)).ToArray();
        foreach (var expected in new[] { "TinyMixtral", "TinyMixtral.dll", "libcoreclr.so", "libhostfxr.so", "TorchSharp.dll", "libLibTorchSharp.so", "run", "data/tiny_text_document.bin" })
            Assert.Contains(expected, files);
        Assert.DoesNotContain(files, f => Regex.IsMatch(Path.GetFileName(f), @"^(libtorch|libc10|libgomp|libshm|libaoti).*\.so") || f.EndsWith(".pdb", StringComparison.Ordinal));

        string run = Path.Combine(bundle, "run");
        Assert.True(File.GetUnixFileMode(run).HasFlag(UnixFileMode.UserExecute));
        string script = File.ReadAllText(run);
        Assert.StartsWith("#!/usr/bin/env bash\n", script);
        Assert.Contains("import os, torch; print(os.path.join(os.path.dirname(torch.__file__), \"lib\"))", script);
        Assert.Contains("import os, nvidia.nccl; print(os.path.join(list(nvidia.nccl.__path__)[0], \"lib\"))", script);
        Assert.Contains("export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1\n", script);
        Assert.Contains("exec \"$here/TinyMixtral\" \"$@\"\n", script);
        Assert.DoesNotContain("@APP", script);

        string archive = Path.Combine(_root, "TinyMixtral.tar.gz");
        Assert.True(File.Exists(archive));
        Assert.False(File.Exists(archive + ".tmp"));
        Assert.InRange(new FileInfo(archive).Length, 1, 60L << 20); // ≤ 60 MiB to carry to the GPU host (xz: about 27 MiB)
        var (tarExit, listing) = Process("tar", $"-tzf \"{archive}\"", _root, new());
        Assert.Equal(0, tarExit);
        Assert.Contains("TinyMixtral/run\n", listing);
        Assert.DoesNotContain("libtorch_cpu", listing);

        // No PyTorch to be found: a clear message and exit code 127, not a crash inside TorchSharp.
        var (noTorch, message) = Process(run, "plan", _root, new() { ["PYTHON"] = "/nonexistent/python3", ["MOE_TORCH_LIB"] = "" });
        Assert.Equal(127, noTorch);
        Assert.Contains("there is no CUDA libtorch to load", message);

        // Pointed at a libtorch (the CPU one from the package folder), the bundle trains.
        string packagesProps = File.ReadAllText(Path.Combine(repo, "Directory.Packages.props"));
        string libtorchVersion = Regex.Match(packagesProps, "Include=\"libtorch-cpu-linux-x64\" Version=\"([^\"]+)\"").Groups[1].Value;
        string packages = Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } p ? p
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        string torchLib = Path.Combine(packages, "libtorch-cpu-linux-x64", libtorchVersion, "runtimes", "linux-x64", "native");
        Assert.True(File.Exists(Path.Combine(torchLib, "libtorch.so")), torchLib);
        var (trained, log) = Process(run, "train --steps 10 --seq-length 32", _root, new() { ["MOE_TORCH_LIB"] = torchLib });
        Assert.True(trained == 0, log);
        Assert.Contains("done: lm_loss", log);
    }

    private static (int Exit, string Output) Process(string file, string arguments, string dir, Dictionary<string, string> environment)
    {
        var psi = new ProcessStartInfo(file, arguments) { WorkingDirectory = dir, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var (key, value) in environment) psi.Environment[key] = value;
        using var proc = System.Diagnostics.Process.Start(psi)!;
        var stdout = proc.StandardOutput.ReadToEndAsync();
        var stderr = proc.StandardError.ReadToEndAsync();
        if (!proc.WaitForExit(300_000))
        {
            proc.Kill(entireProcessTree: true);
            throw new TimeoutException($"{file} {arguments} took more than 5 minutes");
        }
        return (proc.ExitCode, stdout.Result + stderr.Result);
    }
}
