// TEMPORARY STAND-IN (branch generators): the recipe evaluator belongs to the analyzers branch
// (src/Generators/Evaluation/RecipeEvaluator.cs). This covers only what the three shipped recipes use
// (constant initializers, enum members, Dsl presets, `with`) so the generator can be built and tested
// before it lands; delete this file when RecipeEvaluator is merged.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.Linq;
using System.Reflection;
using System.Threading;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp.Syntax;
using Moe.Dsl;

namespace Moe.Generators.StandIn;

internal static class StandInRecipeEvaluator
{
    private static readonly string[] SettingNames = ["Model", "Parallelism", "Router", "Capacity", "Dispatcher", "Data", "Training", "Checkpoint", "Nccl"];

    public static RecipeSettings Evaluate(INamedTypeSymbol recipe, Compilation compilation, CancellationToken cancellationToken)
    {
        var settings = new RecipeSettings { Name = recipe.Name };
        var unknown = new List<string>();
        foreach (string name in SettingNames)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var body = FindOverride(recipe, name);
            if (body is null)
            {
                if (name == "Model") unknown.Add(name);
                continue;
            }
            var property = typeof(RecipeSettings).GetProperty(name)!;
            var model = compilation.GetSemanticModel(body.SyntaxTree);
            object? value = Eval(body, property.PropertyType, model, name, unknown);
            if (value is not null) property.SetValue(settings, value);
        }
        return settings with { Unknown = unknown.OrderBy(u => u, StringComparer.Ordinal).ToArray() };
    }

    private static ExpressionSyntax? FindOverride(INamedTypeSymbol recipe, string name)
    {
        for (var type = recipe; type is not null && type.ToDisplayString() != "Moe.Dsl.Recipe"; type = type.BaseType)
        {
            foreach (var property in type.GetMembers(name).OfType<IPropertySymbol>())
            {
                foreach (var reference in property.DeclaringSyntaxReferences)
                {
                    if (reference.GetSyntax() is PropertyDeclarationSyntax declaration && declaration.ExpressionBody is { } arrow)
                        return arrow.Expression;
                }
            }
        }
        return null;
    }

    private static object? Eval(ExpressionSyntax expression, Type type, SemanticModel model, string path, List<string> unknown)
    {
        switch (expression)
        {
            case BaseObjectCreationExpressionSyntax creation when creation.ArgumentList is null || creation.ArgumentList.Arguments.Count == 0:
                return Assign(Activator.CreateInstance(type)!, creation.Initializer, model, path, unknown);
            case WithExpressionSyntax with:
                object? original = Eval(with.Expression, type, model, path, unknown);
                if (original is null) return null;
                object copy = type.GetMethod("<Clone>$")!.Invoke(original, null)!;
                return Assign(copy, with.Initializer, model, path, unknown);
        }
        var constant = model.GetConstantValue(expression);
        var target = Nullable.GetUnderlyingType(type) ?? type;
        if (constant.HasValue)
        {
            if (constant.Value is null) return null;
            return target.IsEnum
                ? Enum.ToObject(target, constant.Value)
                : Convert.ChangeType(constant.Value, target, CultureInfo.InvariantCulture);
        }
        if (model.GetSymbolInfo(expression).Symbol is IPropertySymbol { IsStatic: true } preset
            && preset.ContainingType.ContainingNamespace.ToDisplayString() == "Moe.Dsl"
            && typeof(RecipeSettings).Assembly.GetType(preset.ContainingType.ToDisplayString()) is { } dslType
            && dslType.GetProperty(preset.Name, BindingFlags.Public | BindingFlags.Static) is { } presetProperty)
        {
            return presetProperty.GetValue(null);
        }
        unknown.Add(path);
        return null;
    }

    private static object Assign(object instance, InitializerExpressionSyntax? initializer, SemanticModel model, string path, List<string> unknown)
    {
        foreach (var assignment in initializer?.Expressions.OfType<AssignmentExpressionSyntax>() ?? [])
        {
            if (assignment.Left is not IdentifierNameSyntax name || instance.GetType().GetProperty(name.Identifier.ValueText) is not { } property)
            {
                unknown.Add(path);
                continue;
            }
            string memberPath = path + "." + property.Name;
            int before = unknown.Count;
            object? value = Eval(assignment.Right, property.PropertyType, model, memberPath, unknown);
            if (unknown.Count == before) property.SetValue(instance, value);
        }
        return instance;
    }
}
