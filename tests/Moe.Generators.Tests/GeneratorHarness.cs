using System.Collections.Immutable;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using Moe.Generators;

namespace Moe.Generators.Tests;

/// <summary>Runs the recipe generator on source text, with the references a recipe project has.</summary>
internal static class GeneratorHarness
{
    private static readonly ImmutableArray<MetadataReference> References =
        ((string)AppContext.GetData("TRUSTED_PLATFORM_ASSEMBLIES")!).Split(Path.PathSeparator)
            .Where(p => Path.GetFileName(p).StartsWith("System", StringComparison.Ordinal) || Path.GetFileName(p) is "mscorlib.dll" or "netstandard.dll")
            .Select(p => (MetadataReference)MetadataReference.CreateFromFile(p))
            .Append(MetadataReference.CreateFromFile(typeof(Moe.Dsl.Recipe).Assembly.Location))
            .Append(MetadataReference.CreateFromFile(typeof(Moe.Runtime.Commands.MoeCommands).Assembly.Location))
            .ToImmutableArray();

    public static CSharpCompilation Compilation(params string[] sources) => Compilation(OutputKind.ConsoleApplication, sources);

    public static CSharpCompilation Compilation(OutputKind kind, params string[] sources) => CSharpCompilation.Create("Recipe",
        sources.Select((s, i) => CSharpSyntaxTree.ParseText(s, new CSharpParseOptions(LanguageVersion.Latest), path: $"Source{i}.cs")),
        References, new CSharpCompilationOptions(kind, nullableContextOptions: NullableContextOptions.Enable));

    /// <summary>Runs the generator, compiles its output warning-free and loads it, so tests can read the emitted data itself.</summary>
    public static System.Reflection.Assembly RunAndLoad(params string[] sources) => RunAndLoad(OutputKind.ConsoleApplication, sources);

    /// <summary>As <see cref="RunAndLoad(string[])"/> for a compilation of the given kind (a library for several recipes: no entry point is generated then).</summary>
    public static System.Reflection.Assembly RunAndLoad(OutputKind kind, params string[] sources) => RunAndLoad(kind, out _, sources);

    /// <summary>As <see cref="RunAndLoad(OutputKind, string[])"/>, also giving the generated files by hint name.</summary>
    public static System.Reflection.Assembly RunAndLoad(OutputKind kind, out IReadOnlyDictionary<string, string> generated, params string[] sources)
    {
        var driver = Driver().RunGeneratorsAndUpdateCompilation(Compilation(kind, sources), out var output, out var generatorDiagnostics);
        generated = driver.GetRunResult().Results.Single().GeneratedSources.ToDictionary(s => s.HintName, s => s.SourceText.ToString());
        if (generatorDiagnostics.Length > 0) throw new InvalidOperationException(string.Join("\n", generatorDiagnostics));
        using var stream = new MemoryStream();
        var emit = output.Emit(stream);
        var problems = emit.Diagnostics.Where(d => d.Severity >= DiagnosticSeverity.Warning).ToArray();
        if (!emit.Success || problems.Length > 0) throw new InvalidOperationException("generated code does not compile cleanly:\n" + string.Join("\n", problems));
        stream.Position = 0;
        return new System.Runtime.Loader.AssemblyLoadContext(null, isCollectible: true).LoadFromStream(stream);
    }

    public static GeneratorDriver Driver() => CSharpGeneratorDriver.Create(
        [new RecipeGenerator().AsSourceGenerator()], driverOptions: new GeneratorDriverOptions(IncrementalGeneratorOutputKind.None, trackIncrementalGeneratorSteps: true));

    /// <summary>Generated files by hint name, after checking that the output compiles without errors or warnings.</summary>
    public static IReadOnlyDictionary<string, string> Run(params string[] sources) => Run(OutputKind.ConsoleApplication, sources);

    /// <summary>Generated files by hint name for a compilation of the given kind, checked as <see cref="Run(string[])"/> does.</summary>
    public static IReadOnlyDictionary<string, string> Run(OutputKind kind, params string[] sources)
    {
        var compilation = Compilation(kind, sources);
        var driver = Driver().RunGeneratorsAndUpdateCompilation(compilation, out var output, out var generatorDiagnostics);
        if (generatorDiagnostics.Length > 0) throw new InvalidOperationException(string.Join("\n", generatorDiagnostics));
        var problems = output.GetDiagnostics().Where(d => d.Severity >= DiagnosticSeverity.Warning).ToArray();
        if (problems.Length > 0) throw new InvalidOperationException("generated code does not compile cleanly:\n" + string.Join("\n", problems));
        return driver.GetRunResult().Results.Single().GeneratedSources.ToDictionary(s => s.HintName, s => s.SourceText.ToString());
    }
}
