using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using Moe.Dsl;
using TorchSharp;

namespace Moe.Runtime.Monitoring;

/// <summary>
/// The directory one run writes into: metrics.jsonl, train.log, tensorboard/, recipe.json (the resolved recipe
/// after command-line overrides) and environment.json (versions, device, git commit). By default
/// runs/&lt;recipe&gt;-&lt;UTC timestamp&gt; under the working directory. It is created and written before the model is
/// built, so a directory that cannot be written is an error before training starts.
/// </summary>
public sealed class RunDirectory
{
    /// <summary>File names inside a run directory (what <c>moe report</c> reads).</summary>
    public const string MetricsFile = "metrics.jsonl", LogFile = "train.log", RecipeFile = "recipe.json", EnvironmentFile = "environment.json";

    private RunDirectory(string path, string id)
    {
        Path = path;
        Id = id;
    }

    /// <summary>Full path of the directory.</summary>
    public string Path { get; }

    /// <summary>The run's id: written into every metrics line, so a file holding several runs tells them apart.</summary>
    public string Id { get; }

    /// <summary>A file inside the directory.</summary>
    public string File(string name) => System.IO.Path.Combine(Path, name);

    /// <summary>Creates the directory (<paramref name="requested"/>, else runs/&lt;recipe&gt;-&lt;timestamp&gt;) and writes recipe.json into it.</summary>
    public static RunDirectory Create(string? requested, RecipeSettings settings, DateTimeOffset now)
    {
        string stamp = now.UtcDateTime.ToString("yyyyMMdd-HHmmss", CultureInfo.InvariantCulture);
        string path = System.IO.Path.GetFullPath(requested ?? System.IO.Path.Combine("runs", $"{settings.Name}-{stamp}"));
        if (requested is null)
            for (int n = 2; Directory.Exists(path); n++) path = System.IO.Path.GetFullPath(System.IO.Path.Combine("runs", $"{settings.Name}-{stamp}-{n}"));
        if (System.IO.File.Exists(path))
            throw new UserError($"The run directory {path} is a file; choose a directory with --run-dir DIR.");
        var run = new RunDirectory(path, $"{settings.Name}-{stamp}-{Guid.NewGuid().ToString("N")[..8]}");
        try
        {
            Directory.CreateDirectory(path);
            run.WriteJson(RecipeFile, settings);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new UserError($"The run directory {path} cannot be written: {e.Message}. Choose another with --run-dir DIR.");
        }
        return run;
    }

    /// <summary>Writes environment.json: the versions and the machine the run used.</summary>
    public void WriteEnvironment(string device, DateTimeOffset started)
    {
        WriteJson(EnvironmentFile, new Dictionary<string, object?>
        {
            ["run"] = Id,
            ["started"] = started.ToString("o", CultureInfo.InvariantCulture),
            ["command_line"] = Environment.GetCommandLineArgs(),
            ["working_directory"] = Environment.CurrentDirectory,
            ["host"] = Environment.MachineName,
            ["os"] = RuntimeInformation.OSDescription,
            ["dotnet"] = RuntimeInformation.FrameworkDescription,
            ["moe"] = Version(typeof(RunDirectory).Assembly),
            ["torchsharp"] = Version(typeof(torch).Assembly),
            ["libtorch"] = torch.__version__,
            ["libtorch_from"] = Environment.GetEnvironmentVariable("MOE_TORCH_LIB") ?? "the libtorch package beside the program",
            ["device"] = device,
            ["cuda_devices"] = device == "cuda" ? torch.cuda.device_count() : null,
            ["cpu_threads"] = torch.get_num_threads(),
            ["git_commit"] = Git("rev-parse HEAD"),
            ["git_dirty"] = Git("status --porcelain") is string status ? status.Length > 0 : null,
        });
    }

    /// <summary>The run's log file, for a <see cref="TeeWriter"/> beside the console (auto-flushed: a crash keeps every line).</summary>
    public StreamWriter OpenLog() => new(File(LogFile), append: true, new UTF8Encoding(false)) { AutoFlush = true };

    private void WriteJson(string name, object value)
    {
        var options = new JsonSerializerOptions { WriteIndented = true, Converters = { new JsonStringEnumConverter() }, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
        string tmp = File(name + ".tmp");
        System.IO.File.WriteAllText(tmp, JsonSerializer.Serialize(value, options) + "\n");
        System.IO.File.Move(tmp, File(name), overwrite: true);
    }

    private static string? Version(Assembly a) =>
        a.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? a.GetName().Version?.ToString();

    /// <summary>git's answer in the working directory, or null (no git, not a repository, or no answer within 5 s).</summary>
    private static string? Git(string arguments)
    {
        try
        {
            using var p = Process.Start(new ProcessStartInfo("git", arguments)
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                UseShellExecute = false,
            });
            if (p is null) return null;
            var output = p.StandardOutput.ReadToEndAsync();
            _ = p.StandardError.ReadToEndAsync();
            if (!p.WaitForExit(5000))
            {
                p.Kill(entireProcessTree: true);
                return null;
            }
            return p.ExitCode == 0 ? output.Result.Trim() : null;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return null;   // git is not installed
        }
    }
}
