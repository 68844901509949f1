using System;
using System.Collections.Generic;
using System.Linq;
using System.Reflection;
using System.Threading;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp.Syntax;
using Microsoft.CodeAnalysis.Operations;
using Moe.Dsl;

namespace Moe.Generators.Evaluation;

/// <summary>
/// Evaluates a [Recipe] class at compile time from syntax and the semantic model (IOperation):
/// literals, constants, enum members, constant arithmetic, conversions, object initializers,
/// <c>with</c> expressions, Moe.Dsl presets (read from the Moe.Dsl assembly shipped beside the
/// analyzer), user presets (static members evaluated from their source), and overrides inherited from
/// base recipes. A value it cannot evaluate is recorded as unknown — never guessed — and keeps its
/// default, so the rules that read it wait for start-up. Shared by the analyzers and the generator.
/// </summary>
public static class RecipeEvaluator
{
    private static readonly Assembly Dsl = typeof(Recipe).Assembly;

    /// <summary>The settings a recipe overrides, in <see cref="RecipeSettings"/> order.</summary>
    public static readonly string[] SettingNames = ["Model", "Parallelism", "Router", "Capacity", "Dispatcher", "Data", "Training", "Checkpoint", "Nccl", "Health", "Recompute"];

    public static RecipeEvaluation Evaluate(INamedTypeSymbol recipe, Compilation compilation, CancellationToken cancellationToken)
    {
        var context = new Context(compilation, cancellationToken);
        var values = new Dictionary<string, object?>(StringComparer.Ordinal);
        foreach (var name in SettingNames)
        {
            var property = FindOverride(recipe, name);
            if (property is null) continue;
            var expression = ValueExpression(property, cancellationToken);
            if (expression is null)
            {
                context.Unknown(name, property.Locations.FirstOrDefault() ?? Location.None, "it is not declared in source");
                continue;
            }
            context.Locations[name] = expression.GetLocation();
            values[name] = context.Evaluate(expression, name);
        }
        var defaults = new RecipeSettings();
        var settings = new RecipeSettings
        {
            Name = recipe.Name,
            Model = values.TryGetValue("Model", out var m) && m is Model model ? model : defaults.Model,
            Parallelism = values.TryGetValue("Parallelism", out var p) && p is Parallelism par ? par : defaults.Parallelism,
            Router = values.TryGetValue("Router", out var r) && r is Router router ? router : defaults.Router,
            Capacity = values.TryGetValue("Capacity", out var c) && c is Capacity capacity ? capacity : defaults.Capacity,
            Dispatcher = values.TryGetValue("Dispatcher", out var d) && d is TokenDispatcher dispatcher ? dispatcher : defaults.Dispatcher,
            Data = values.TryGetValue("Data", out var da) && da is Data data ? data : defaults.Data,
            Training = values.TryGetValue("Training", out var t) && t is Training training ? training : defaults.Training,
            Checkpoint = values.TryGetValue("Checkpoint", out var ck) && ck is Checkpoint checkpoint ? checkpoint : defaults.Checkpoint,
            Nccl = values.TryGetValue("Nccl", out var n) && n is Nccl nccl ? nccl : defaults.Nccl,
            Health = values.TryGetValue("Health", out var h) && h is Health health ? health : defaults.Health,
            Recompute = values.TryGetValue("Recompute", out var rc) && rc is Recompute recompute ? recompute : defaults.Recompute,
            Unknown = context.UnknownSettings.Select(u => u.Path).Distinct().ToArray(),
        };
        if (!values.ContainsKey("Model") && !settings.Unknown.Contains("Model"))
            settings = settings with { Unknown = settings.Unknown.Concat(new[] { "Model" }).ToArray() };
        var classLocation = recipe.Locations.FirstOrDefault(l => l.IsInSource) ?? Location.None;
        return new RecipeEvaluation(settings, context.Locations, context.UnknownSettings, classLocation);
    }

    private static IPropertySymbol? FindOverride(INamedTypeSymbol recipe, string name)
    {
        for (var type = recipe; type is not null; type = type.BaseType)
        {
            if (type.ToDisplayString() == "Moe.Dsl.Recipe") return null;
            var property = type.GetMembers(name).OfType<IPropertySymbol>().FirstOrDefault(p => !p.IsStatic);
            if (property is not null) return property;
        }
        return null;
    }

    private static ExpressionSyntax? ValueExpression(ISymbol member, CancellationToken ct)
    {
        foreach (var reference in member.DeclaringSyntaxReferences)
        {
            switch (reference.GetSyntax(ct))
            {
                case PropertyDeclarationSyntax { ExpressionBody: { } arrow }:
                    return arrow.Expression;
                case PropertyDeclarationSyntax { Initializer: { } init }:
                    return init.Value;
                case PropertyDeclarationSyntax { AccessorList: { } accessors }:
                    var getter = accessors.Accessors.FirstOrDefault(a => a.Keyword.Text == "get");
                    if (getter?.ExpressionBody is { } body) return body.Expression;
                    if (getter?.Body?.Statements.Count == 1 && getter.Body.Statements[0] is ReturnStatementSyntax { Expression: { } ret }) return ret;
                    break;
                case VariableDeclaratorSyntax { Initializer: { } fieldInit }:
                    return fieldInit.Value;
            }
        }
        return null;
    }

    private sealed class Context
    {
        private readonly Compilation _compilation;
        private readonly CancellationToken _ct;

        public Context(Compilation compilation, CancellationToken ct)
        {
            _compilation = compilation;
            _ct = ct;
        }

        public Dictionary<string, Location> Locations { get; } = new(StringComparer.Ordinal);

        public List<UnknownSetting> UnknownSettings { get; } = new();

        public void Unknown(string path, Location location, string reason)
        {
            if (UnknownSettings.All(u => u.Path != path)) UnknownSettings.Add(new UnknownSetting(path, location, reason));
        }

        public object? Evaluate(ExpressionSyntax expression, string path)
        {
            var model = _compilation.GetSemanticModel(expression.SyntaxTree);
            var operation = model.GetOperation(expression, _ct);
            if (operation is null)
            {
                Unknown(path, expression.GetLocation(), "it could not be analysed");
                return null;
            }
            return Evaluate(operation, path, recordLocations: true);
        }

        private object? Evaluate(IOperation operation, string path, bool recordLocations)
        {
            _ct.ThrowIfCancellationRequested();
            if (operation.ConstantValue.HasValue)
                return Convert(operation.ConstantValue.Value, operation.Type);
            switch (operation)
            {
                case IConversionOperation conversion:
                    return Convert(Evaluate(conversion.Operand, path, recordLocations), conversion.Type);
                case IParenthesizedOperation parenthesized:
                    return Evaluate(parenthesized.Operand, path, recordLocations);
                case IObjectCreationOperation creation when DslType(creation.Type) is { } type && creation.Arguments.Length == 0:
                    var created = Activator.CreateInstance(type);
                    Apply(created, creation.Initializer, path, recordLocations);
                    return created;
                case IWithOperation with:
                    var receiver = Evaluate(with.Operand, path, recordLocations: false);
                    if (receiver is null) return null;
                    var clone = receiver.GetType().GetMethod("<Clone>$")!.Invoke(receiver, null);
                    Apply(clone, with.Initializer, path, recordLocations);
                    return clone;
                case IPropertyReferenceOperation { Instance: null } staticProperty:
                    return StaticMember(staticProperty.Property, staticProperty.Syntax, path);
                case IFieldReferenceOperation { Instance: null } staticField:
                    return StaticMember(staticField.Field, staticField.Syntax, path);
                default:
                    Unknown(path, operation.Syntax.GetLocation(), Describe(operation));
                    return null;
            }
        }

        private object? StaticMember(ISymbol member, SyntaxNode syntax, string path)
        {
            string container = member.ContainingType.ToDisplayString();
            if (member.ContainingAssembly?.Name == "Moe.Dsl" && Dsl.GetType(container) is { } type)
            {
                var value = type.GetProperty(member.Name, BindingFlags.Public | BindingFlags.Static)?.GetValue(null)
                    ?? type.GetField(member.Name, BindingFlags.Public | BindingFlags.Static)?.GetValue(null);
                if (value is not null) return value;
            }
            if (member is IFieldSymbol { IsReadOnly: false } || member is IPropertySymbol { SetMethod: { IsInitOnly: false } })
            {
                Unknown(path, syntax.GetLocation(), $"{member.Name} can change at run time");
                return null;
            }
            var expression = ValueExpression(member, _ct);
            if (expression is null)
            {
                Unknown(path, syntax.GetLocation(), $"{container}.{member.Name} has no source to evaluate");
                return null;
            }
            var model = _compilation.GetSemanticModel(expression.SyntaxTree);
            var operation = model.GetOperation(expression, _ct);
            return operation is null ? null : Evaluate(operation, path, recordLocations: false);
        }

        private void Apply(object? target, IObjectOrCollectionInitializerOperation? initializer, string path, bool recordLocations)
        {
            if (target is null || initializer is null) return;
            foreach (var item in initializer.Initializers)
            {
                if (item is not ISimpleAssignmentOperation { Target: IPropertyReferenceOperation property } assignment) continue;
                string member = $"{path}.{property.Property.Name}";
                if (recordLocations) Locations[member] = assignment.Syntax.GetLocation();
                int before = UnknownSettings.Count;
                var value = Evaluate(assignment.Value, member, recordLocations);
                if (UnknownSettings.Count > before) continue;
                var runtimeProperty = target.GetType().GetProperty(property.Property.Name);
                runtimeProperty?.SetValue(target, value);
            }
        }

        private static Type? DslType(ITypeSymbol? symbol) =>
            symbol is INamedTypeSymbol { ContainingAssembly.Name: "Moe.Dsl" } named ? Dsl.GetType(named.ToDisplayString()) : null;

        private static object? Convert(object? value, ITypeSymbol? type)
        {
            if (value is null || type is null) return value;
            if (type is INamedTypeSymbol { OriginalDefinition.SpecialType: SpecialType.System_Nullable_T } nullable)
                type = nullable.TypeArguments[0];
            if (type.TypeKind == TypeKind.Enum && DslType(type) is { } enumType)
                return Enum.ToObject(enumType, value);
            return type.SpecialType switch
            {
                SpecialType.System_Int32 => System.Convert.ToInt32(value, System.Globalization.CultureInfo.InvariantCulture),
                SpecialType.System_Int64 => System.Convert.ToInt64(value, System.Globalization.CultureInfo.InvariantCulture),
                SpecialType.System_Double => System.Convert.ToDouble(value, System.Globalization.CultureInfo.InvariantCulture),
                SpecialType.System_Single => System.Convert.ToSingle(value, System.Globalization.CultureInfo.InvariantCulture),
                _ => value,
            };
        }

        private static string Describe(IOperation operation) => operation switch
        {
            IInvocationOperation invocation => $"it calls {invocation.TargetMethod.Name}()",
            IFieldReferenceOperation field => $"{field.Field.Name} is not a constant",
            IPropertyReferenceOperation property => $"{property.Property.Name} is evaluated at run time",
            ILocalReferenceOperation local => $"the local {local.Local.Name} is not a constant",
            _ => "its value is computed at run time",
        };
    }
}
