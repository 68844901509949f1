namespace Moe.Generators;

/// <summary>
/// Everything the emitter needs about one [Recipe] class, as plain values: no symbol, syntax node,
/// location or compilation survives the parse step, so equal recipes give equal specs and the
/// pipeline stops there.
/// </summary>
/// <param name="Namespace">The recipe's namespace, or null for the global namespace.</param>
/// <param name="ClassName">The recipe class's name, e.g. "Mixtral8x7b".</param>
/// <param name="FullyQualifiedName">The recipe type with <c>global::</c>, for the emitted code.</param>
/// <param name="IsPublic">Whether the recipe is public (the wiring class matches it).</param>
/// <param name="ModelName">The model's display name.</param>
/// <param name="Layout">The rank layout, or null when the recipe did not validate (the fallback is emitted).</param>
/// <param name="Findings">Compile-time errors (rule ID, path, message), ordinal order; empty for a valid recipe.</param>
/// <param name="Unknown">Setting paths not known at compile time, ordinal order.</param>
public sealed record RecipeSpec(
    string? Namespace,
    string ClassName,
    string FullyQualifiedName,
    bool IsPublic,
    string ModelName,
    LayoutSpec? Layout,
    EquatableArray<string> Findings,
    EquatableArray<string> Unknown);
