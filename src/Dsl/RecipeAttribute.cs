using System;

namespace Moe.Dsl;

/// <summary>
/// Marks a class deriving from <see cref="Recipe"/> as a training recipe. The Moe analyzers check
/// it at compile time and the Moe generators emit its parallel-group wiring and entry point.
/// </summary>
[AttributeUsage(AttributeTargets.Class, AllowMultiple = false, Inherited = false)]
public sealed class RecipeAttribute : Attribute
{
}
