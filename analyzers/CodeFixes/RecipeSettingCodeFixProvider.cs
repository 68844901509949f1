using System.Collections.Immutable;
using System.Composition;
using System.Linq;
using System.Threading;
using System.Threading.Tasks;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CodeActions;
using Microsoft.CodeAnalysis.CodeFixes;
using Microsoft.CodeAnalysis.CSharp;
using Microsoft.CodeAnalysis.CSharp.Syntax;
using Moe.Dsl.Validation;
using RuleSet = Moe.Dsl.Validation.RuleSet;

namespace Moe.Analyzers;

/// <summary>
/// Applies the fix the rule set attaches to a finding (the nearest valid divisor for Expert/Tensor/Pipeline,
/// the GPU count that makes the products divide, removing a setting that contradicts another, turning
/// sequence parallel on or off, …): sets the property in the recipe's initializer to the suggested value,
/// adds the assignment when the recipe does not set it, or removes it. One provider serves every rule
/// because every fix comes from the one rule set; Fix-All batches them.
/// </summary>
[ExportCodeFixProvider(LanguageNames.CSharp, Name = nameof(RecipeSettingCodeFixProvider)), Shared]
public sealed class RecipeSettingCodeFixProvider : CodeFixProvider
{
    public override ImmutableArray<string> FixableDiagnosticIds { get; } =
        RuleSet.Descriptors.Where(d => d.Category != RuleCategory.StartUp).Select(d => d.Id).ToImmutableArray();

    public override FixAllProvider GetFixAllProvider() => WellKnownFixAllProviders.BatchFixer;

    public override async Task RegisterCodeFixesAsync(CodeFixContext context)
    {
        var root = await context.Document.GetSyntaxRootAsync(context.CancellationToken).ConfigureAwait(false);
        if (root is null) return;
        foreach (var diagnostic in context.Diagnostics)
        {
            if (!diagnostic.Properties.TryGetValue(RecipeAnalyzer.FixPath, out var path) || path is null) continue;
            diagnostic.Properties.TryGetValue(RecipeAnalyzer.FixValue, out var value);
            diagnostic.Properties.TryGetValue(RecipeAnalyzer.FixTitle, out var title);
            var node = root.FindNode(diagnostic.Location.SourceSpan, getInnermostNodeForTie: true);
            var initializer = FindInitializer(node);
            if (initializer is null) continue;
            string member = path.Substring(path.LastIndexOf('.') + 1);
            context.RegisterCodeFix(
                CodeAction.Create(title ?? $"Fix {member}", ct => Apply(context.Document, initializer, member, value, ct), equivalenceKey: diagnostic.Id),
                diagnostic);
        }
    }

    /// <summary>The object initializer that holds (or should hold) the setting: the assignment's own, or the one inside the reported expression.</summary>
    private static InitializerExpressionSyntax? FindInitializer(SyntaxNode node) =>
        node.AncestorsAndSelf().OfType<InitializerExpressionSyntax>().FirstOrDefault()
        ?? node.DescendantNodesAndSelf().OfType<InitializerExpressionSyntax>().FirstOrDefault();

    private static async Task<Document> Apply(Document document, InitializerExpressionSyntax initializer, string member, string? value, CancellationToken ct)
    {
        var root = await document.GetSyntaxRootAsync(ct).ConfigureAwait(false);
        if (root is null) return document;
        var existing = initializer.Expressions.OfType<AssignmentExpressionSyntax>()
            .FirstOrDefault(a => a.Left is IdentifierNameSyntax id && id.Identifier.Text == member);
        InitializerExpressionSyntax updated;
        if (value is null)
        {
            if (existing is null) return document;
            var remaining = initializer.Expressions.Remove(existing);
            // Removing the last assignment takes its separator away: keep the spacing before the closing brace.
            if (remaining.Count > 0 && initializer.Expressions.IndexOf(existing) == initializer.Expressions.Count - 1)
                remaining = remaining.Replace(remaining.Last(), remaining.Last().WithTrailingTrivia(existing.GetTrailingTrivia()));
            updated = initializer.WithExpressions(remaining);
        }
        else if (existing is not null)
        {
            updated = initializer.ReplaceNode(existing.Right, SyntaxFactory.ParseExpression(value).WithTriviaFrom(existing.Right));
        }
        else
        {
            var assignment = SyntaxFactory.AssignmentExpression(SyntaxKind.SimpleAssignmentExpression,
                SyntaxFactory.IdentifierName(member), SyntaxFactory.ParseExpression(value));
            updated = initializer.WithExpressions(initializer.Expressions.Add(assignment));
        }
        return document.WithSyntaxRoot(root.ReplaceNode(initializer, updated));
    }
}
