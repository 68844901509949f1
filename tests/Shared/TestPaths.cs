namespace Moe.Tests;

/// <summary>
/// Locates the repository and the shared reference material (fixtures, Megatron vectors) that sits
/// beside the checkout as ../shared. MOE_SHARED overrides the location.
/// </summary>
internal static class TestPaths
{
    public static string RepoRoot { get; } = FindRepoRoot();

    private static readonly Lazy<string> SharedPath = new(FindShared);

    public static string Shared => SharedPath.Value;

    public static string Fixture(params string[] parts) => Path.Combine([Shared, "fixtures", .. parts]);

    private static string FindRepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "Dsl.sln"))) return dir.FullName;
        }
        throw new InvalidOperationException($"No Dsl.sln above {AppContext.BaseDirectory}; run the tests from the repository.");
    }

    private static string FindShared()
    {
        string? env = Environment.GetEnvironmentVariable("MOE_SHARED");
        string path = string.IsNullOrEmpty(env) ? Path.GetFullPath(Path.Combine(RepoRoot, "..", "shared")) : env;
        if (!Directory.Exists(Path.Combine(path, "fixtures")))
            throw new InvalidOperationException($"The shared reference material was not found at {path} (expected fixtures/ there); set MOE_SHARED to its folder.");
        return path;
    }
}
