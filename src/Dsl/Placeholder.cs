namespace Moe.Dsl; internal static class Placeholder { }
