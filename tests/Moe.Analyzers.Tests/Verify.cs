using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CodeFixes;
using Microsoft.CodeAnalysis.CSharp.Testing;
using Microsoft.CodeAnalysis.Diagnostics;
using Microsoft.CodeAnalysis.Testing;

namespace Moe.Analyzers.Tests;

/// <summary>Microsoft.CodeAnalysis.Testing harness with Moe.Dsl referenced, as a recipe project has it.</summary>
internal static class Verify
{
    private static readonly MetadataReference Dsl = MetadataReference.CreateFromFile(typeof(Moe.Dsl.Recipe).Assembly.Location);

    public const string Usings = "using Moe.Dsl;\nusing Moe.Dsl.Layout;\n\nnamespace Demo;\n\n";

    public static Task Analyzer<TAnalyzer>(string source, params DiagnosticResult[] expected)
        where TAnalyzer : DiagnosticAnalyzer, new() => Analyzer<TAnalyzer>(source, editorConfig: null, expected);

    public static async Task Analyzer<TAnalyzer>(string source, string? editorConfig, params DiagnosticResult[] expected)
        where TAnalyzer : DiagnosticAnalyzer, new()
    {
        var test = new CSharpAnalyzerTest<TAnalyzer, DefaultVerifier>
        {
            TestCode = Usings + source,
            ReferenceAssemblies = ReferenceAssemblies.Net.Net80,
        };
        test.TestState.AdditionalReferences.Add(Dsl);
        if (editorConfig is not null) test.TestState.AnalyzerConfigFiles.Add(("/.editorconfig", editorConfig));
        test.ExpectedDiagnostics.AddRange(expected);
        await test.RunAsync();
    }

    public static async Task CodeFix<TAnalyzer>(string source, string fixedSource, DiagnosticResult[] expected, int iterations = 1)
        where TAnalyzer : DiagnosticAnalyzer, new()
    {
        var test = new CSharpCodeFixTest<TAnalyzer, RecipeSettingCodeFixProvider, DefaultVerifier>
        {
            TestCode = Usings + source,
            FixedCode = Usings + fixedSource,
            ReferenceAssemblies = ReferenceAssemblies.Net.Net80,
            NumberOfFixAllIterations = iterations,
        };
        test.TestState.AdditionalReferences.Add(Dsl);
        test.FixedState.AdditionalReferences.Add(Dsl);
        test.ExpectedDiagnostics.AddRange(expected);
        await test.RunAsync();
    }

    public static DiagnosticResult Diagnostic(string id, DiagnosticSeverity severity = DiagnosticSeverity.Error) => new(id, severity);
}
