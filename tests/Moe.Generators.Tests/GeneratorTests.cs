using System.Text;
using System.Text.Json.Nodes;
using DiffPlex.DiffBuilder;
using DiffPlex.DiffBuilder.Model;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using Moe.Generators;
using Moe.Generators.Specs;
using Xunit;

namespace Moe.Generators.Tests;

public class GeneratorTests
{
    private static string RecipeSource(string name) => File.ReadAllText(Path.Combine(Moe.Tests.TestPaths.RepoRoot, "recipes", name, name + ".cs"));

    private static string BaselinePath(string file) => Path.Combine(Moe.Tests.TestPaths.RepoRoot, "tests", "Moe.Generators.Tests", "Baselines", file);

    /// <summary>
    /// The generated source of each shipped recipe against its checked-in baseline. The baselines are our
    /// generator's output, reviewed by hand: sizes against the recipe, groups against Megatron's vectors
    /// (the 8x22B layout is also checked against Megatron's own file below). Set MOE_UPDATE_BASELINES=1
    /// to rewrite them after a deliberate change, then review the diff.
    /// </summary>
    [Theory]
    [InlineData("TinyMixtral")]
    [InlineData("Mixtral8x7b")]
    [InlineData("Mixtral8x22b")]
    public void GeneratedWiring_MatchesTheBaseline(string recipe)
    {
        var generated = GeneratorHarness.Run(RecipeSource(recipe));
        foreach (var (hint, text) in generated.OrderBy(g => g.Key, StringComparer.Ordinal))
        {
            string path = BaselinePath($"{recipe}.{hint}");
            if (Environment.GetEnvironmentVariable("MOE_UPDATE_BASELINES") == "1") File.WriteAllText(path, text);
            Assert.True(File.Exists(path), $"no baseline {path}");
            string expected = File.ReadAllText(path);
            if (expected != text) Assert.Fail($"{hint} differs from its baseline:\n{Diff(expected, text)}");
        }
        Assert.Equal(new[] { "Program.g.cs", $"{recipe}.Wiring.g.cs" }.OrderBy(k => k, StringComparer.Ordinal), generated.Keys.OrderBy(k => k, StringComparer.Ordinal));
    }

    private static string Diff(string expected, string actual)
    {
        // Line numbers of the baseline for removed lines and of the generated text for added ones.
        var sb = new StringBuilder();
        var diff = InlineDiffBuilder.Diff(expected, actual);
        int baselineLine = 0, generatedLine = 0;
        foreach (var l in diff.Lines)
        {
            if (l.Type != ChangeType.Inserted) baselineLine++;
            if (l.Type != ChangeType.Deleted) generatedLine++;
            if (l.Type == ChangeType.Deleted) sb.AppendLine($"- baseline  {baselineLine,5}: {l.Text}");
            else if (l.Type == ChangeType.Inserted) sb.AppendLine($"+ generated {generatedLine,5}: {l.Text}");
        }
        return sb.ToString();
    }

    [Fact]
    public void GeneratedGroups_EqualMegatronsForTheRecipesLayout()
    {
        // Mixtral8x22b: 32 GPUs, TP 2, PP 2, EP 8, ETP = TP = 2, default order — Megatron's vector for that layout.
        EqualsMegatronsVector("w32-tp2-pp2-cp1-ep8-etp2-tp-cp-ep-dp-pp.json", Moe.Recipes.Mixtral8x22b.Wiring.Families,
            Moe.Recipes.Mixtral8x22b.Wiring.CommunicatorCreationOrder, Moe.Recipes.Mixtral8x22b.Wiring.Coordinates);
        Assert.Equal(8, Moe.Recipes.Mixtral8x22b.Wiring.DataParallel);
        Assert.Equal(1, Moe.Recipes.Mixtral8x22b.Wiring.ExpertDataParallel);
        // Mixtral8x7b: 32 GPUs, TP 1, PP 4, EP 8 (Megatron's recommended Mixtral training layout), default order.
        EqualsMegatronsVector("w32-tp1-pp4-cp1-ep8-etp1-tp-cp-ep-dp-pp.json", Moe.Recipes.Mixtral8x7b.Wiring.Families,
            Moe.Recipes.Mixtral8x7b.Wiring.CommunicatorCreationOrder, Moe.Recipes.Mixtral8x7b.Wiring.Coordinates);
        Assert.Equal(8, Moe.Recipes.Mixtral8x7b.Wiring.DataParallel);
        Assert.Equal(1, Moe.Recipes.Mixtral8x7b.Wiring.ExpertDataParallel);
    }

    private static void EqualsMegatronsVector(string file, (string Key, int[][] Groups)[] families,
        Moe.Dsl.Layout.GroupCreation[] creationOrder, Moe.Dsl.Layout.RankCoordinates[] coordinates)
    {
        var vector = JsonNode.Parse(File.ReadAllText(Path.Combine(Moe.Tests.TestPaths.Shared, "vectors", "megatron-ranks", file)))!;
        foreach (var (key, groups) in families)
        {
            var expected = vector["groups"]![key]!.AsArray().Select(g => g!.AsArray().Select(r => (int)r!).ToArray()).ToArray();
            Assert.Equal(expected, groups);
        }
        var creation = vector["creation_order"]!.AsArray().Select(c => ((string)c![0]!, (string)c[1]!, (string)c[2]!, (int)c[3]!, (int)c[4]!));
        Assert.Equal(creation, creationOrder.Select(c => (c.Description, c.Backend, c.GroupsKey, c.FirstIndex, c.Count)));
        var coords = vector["coords"]!.AsArray().Select(c => ((int)c!["tp"]!, (int)c["cp"]!, (int)c["dp"]!, (int)c["pp"]!, (int)c["dp_cp"]!, (int)c["ep"]!, (int)c["etp"]!, (int)c["edp"]!));
        Assert.Equal(coords, coordinates.Select(c => (c.Tp, c.Cp, c.Dp, c.Pp, c.DpCp, c.Ep, c.Etp, c.Edp)));
    }

    [Fact]
    public void UnrelatedEdit_LeavesTheRecipeStepCached()
    {
        var compilation = GeneratorHarness.Compilation(RecipeSource("Mixtral8x7b"));
        var driver = GeneratorHarness.Driver().RunGenerators(compilation, TestContext.Current.CancellationToken);
        var edited = compilation.AddSyntaxTrees(CSharpSyntaxTree.ParseText("namespace Other; public static class Unrelated { public const int X = 1; }", new CSharpParseOptions(LanguageVersion.Latest), cancellationToken: TestContext.Current.CancellationToken));
        driver = driver.RunGenerators(edited, TestContext.Current.CancellationToken);
        var steps = driver.GetRunResult().Results.Single().TrackedSteps;
        var outputs = steps[RecipeGenerator.SpecStep].Concat(steps[RecipeGenerator.EntryPointStep]).SelectMany(s => s.Outputs).Select(o => o.Reason).ToArray();
        Assert.NotEmpty(outputs);
        Assert.All(outputs, r => Assert.True(r is IncrementalStepRunReason.Cached or IncrementalStepRunReason.Unchanged, $"step output was {r}"));
        var files = driver.GetRunResult().Results.Single().TrackedOutputSteps.SelectMany(s => s.Value).SelectMany(s => s.Outputs).Select(o => o.Reason);
        Assert.All(files, r => Assert.True(r is IncrementalStepRunReason.Cached or IncrementalStepRunReason.Unchanged, $"output was {r}"));
    }

    [Fact]
    public void RecipeEdit_ModifiesTheSpecAndTheWiring()
    {
        string source = RecipeSource("Mixtral8x7b");
        string moreGpus = source.Replace("Gpus = 32,", "Gpus = 64,");
        Assert.NotEqual(source, moreGpus);
        var compilation = GeneratorHarness.Compilation(source);
        var driver = GeneratorHarness.Driver().RunGenerators(compilation, TestContext.Current.CancellationToken);
        driver = driver.RunGenerators(compilation.ReplaceSyntaxTree(compilation.SyntaxTrees[0],
            CSharpSyntaxTree.ParseText(moreGpus, new CSharpParseOptions(LanguageVersion.Latest), path: "Source0.cs", cancellationToken: TestContext.Current.CancellationToken)), TestContext.Current.CancellationToken);

        var run = driver.GetRunResult().Results.Single();
        Assert.Equal(IncrementalStepRunReason.Modified, run.TrackedSteps[RecipeGenerator.SpecStep].Single().Outputs.Single().Reason);
        Assert.Contains("public const int Gpus = 64;", run.GeneratedSources.Single(s => s.HintName == "Mixtral8x7b.Wiring.g.cs").SourceText.ToString());
    }

    [Fact]
    public void Specs_CompareByValue()
    {
        var compilation = GeneratorHarness.Compilation(RecipeSource("Mixtral8x22b"));
        var symbol = compilation.GetTypeByMetadataName("Moe.Recipes.Mixtral8x22b")!;
        var a = RecipeGenerator.Parser.Parse(symbol, compilation, TestContext.Current.CancellationToken);
        var other = GeneratorHarness.Compilation(RecipeSource("Mixtral8x22b"));
        var b = RecipeGenerator.Parser.Parse(other.GetTypeByMetadataName("Moe.Recipes.Mixtral8x22b")!, other, TestContext.Current.CancellationToken);
        Assert.NotSame(a, b);
        Assert.Equal(a, b);
        Assert.Equal(a.GetHashCode(), b.GetHashCode());
        Assert.NotEqual(a, a with { Gpus = 64 });
        Assert.Equal(new EquatableArray<int>([1, 2]), new EquatableArray<int>([1, 2]));
        Assert.NotEqual(new EquatableArray<int>([1, 2]), new EquatableArray<int>([2, 1]));
    }

    [Fact]
    public void InvalidRecipe_GetsAFallbackAndStillAMain()
    {
        var generated = GeneratorHarness.Run("""
            using Moe.Dsl;
            namespace Demo;
            [Recipe]
            public sealed partial class Broken : Recipe
            {
                public override Model Model => Model.Mixtral8x22B;
                public override Parallelism Parallelism => new() { Gpus = 32, Expert = 16 };
            }
            """);
        Assert.Contains("MOE0003: Expert (16) must divide the 8 experts of Mixtral 8x22B", generated["Broken.Wiring.g.cs"]);
        Assert.DoesNotContain("Wiring", generated["Broken.Wiring.g.cs"].Split('\n').Where(l => !l.StartsWith("//", StringComparison.Ordinal)).Aggregate("", (x, y) => x + y));
        Assert.Contains("MoeCommands.CreateRoot(new global::Demo.Broken().ToSettings())", generated["Program.g.cs"]);
    }
}
