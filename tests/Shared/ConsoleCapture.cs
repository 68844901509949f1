using Xunit;

namespace Moe.Tests;

/// <summary>Runs code with the console captured; tests that use it share the "Console" collection so they never overlap.</summary>
internal static class ConsoleCapture
{
    public static (int Exit, string Out, string Err) Run(Func<int> run)
    {
        var (oldOut, oldErr) = (System.Console.Out, System.Console.Error);
        var (o, e) = (new StringWriter(), new StringWriter());
        System.Console.SetOut(o);
        System.Console.SetError(e);
        try
        {
            return (run(), o.ToString(), e.ToString());
        }
        finally
        {
            System.Console.SetOut(oldOut);
            System.Console.SetError(oldErr);
        }
    }
}

[CollectionDefinition("Console", DisableParallelization = true)]
public sealed class ConsoleCollection;
