using System.Diagnostics;
using Xunit;

namespace Moe.Analyzers.Tests;

/// <summary>`dotnet build` of a copy of recipes/Mixtral8x22b: an invalid layout fails the build with the rule's ID.</summary>
public class EndToEndBuildTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moe-e2e-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string CopyRecipe(string name, Func<string, string> edit)
    {
        string repo = Moe.Tests.TestPaths.RepoRoot;
        string target = Path.Combine(_dir, name);
        Directory.CreateDirectory(target);
        string recipes = Path.Combine(repo, "recipes");
        // The copy builds as a recipe in the repository does: same props/targets (analyzers as Analyzer items), same runtime.
        File.WriteAllText(Path.Combine(_dir, "Directory.Build.props"), $"<Project><Import Project=\"{recipes}/Directory.Build.props\" /></Project>");
        File.WriteAllText(Path.Combine(_dir, "Directory.Build.targets"), $"<Project><Import Project=\"{recipes}/Directory.Build.targets\" /></Project>");
        File.Copy(Path.Combine(repo, "Directory.Packages.props"), Path.Combine(_dir, "Directory.Packages.props"), overwrite: true);
        string csproj = File.ReadAllText(Path.Combine(recipes, "Mixtral8x22b", "Mixtral8x22b.csproj"))
            .Replace("../../src/", Path.Combine(repo, "src") + "/");
        File.WriteAllText(Path.Combine(target, "Mixtral8x22b.csproj"), csproj);
        foreach (var file in Directory.GetFiles(Path.Combine(recipes, "Mixtral8x22b"), "*.cs"))
            File.WriteAllText(Path.Combine(target, Path.GetFileName(file)), edit(File.ReadAllText(file)));
        return target;
    }

    private static (int Exit, string Output) Build(string dir)
    {
        var psi = new ProcessStartInfo("dotnet", "build -nologo -v q")
        {
            WorkingDirectory = dir,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(300_000))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException("dotnet build took more than 5 minutes");
        }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }

    [Fact]
    public void ExpertSixteen_FailsTheBuildWithMOE0003_AndTheUnchangedRecipeBuildsClean()
    {
        string broken = CopyRecipe("broken", source => source.Replace("Expert = 8,", "Expert = 16,"));
        Assert.Contains("Expert = 16,", File.ReadAllText(Path.Combine(broken, "Mixtral8x22b.cs")));
        var (exit, output) = Build(broken);
        Assert.NotEqual(0, exit);
        Assert.Contains("error MOE0003", output);
        Assert.Contains("Expert (16) must divide the 8 experts of Mixtral 8x22B; valid: 1, 2, 4, 8", output);

        string clean = CopyRecipe("clean", source => source);
        (exit, output) = Build(clean);
        Assert.True(exit == 0, output);
        Assert.DoesNotContain("MOE0", output);
    }
}

public class PackageTests
{
    [Fact]
    public void MoeDslPackage_CarriesTheAnalyzersGeneratorsAndTheirMoeDsl()
    {
        string output = Directory.CreateTempSubdirectory("moe-pack-").FullName;
        try
        {
            var psi = new ProcessStartInfo("dotnet", $"pack src/Dsl -nologo -v q -o \"{output}\"")
            {
                WorkingDirectory = Moe.Tests.TestPaths.RepoRoot,
                RedirectStandardOutput = true,
                RedirectStandardError = true,
            };
            using (var p = Process.Start(psi)!)
            {
                string log = p.StandardOutput.ReadToEnd() + p.StandardError.ReadToEnd();
                Assert.True(p.WaitForExit(300_000) && p.ExitCode == 0, log);
            }
            string package = Assert.Single(Directory.GetFiles(output, "Moe.Dsl.*.nupkg"));
            using var zip = System.IO.Compression.ZipFile.OpenRead(package);
            var entries = zip.Entries.Select(e => e.FullName).ToHashSet();
            Assert.Contains("lib/netstandard2.0/Moe.Dsl.dll", entries);
            foreach (var dll in new[] { "Moe.Analyzers.dll", "Moe.Analyzers.CodeFixes.dll", "Moe.Generators.dll", "Moe.Dsl.dll" })
                Assert.Contains("analyzers/dotnet/cs/" + dll, entries);
        }
        finally
        {
            Directory.Delete(output, recursive: true);
        }
    }
}
