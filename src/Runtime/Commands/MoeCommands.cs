using System.CommandLine;

namespace Moe.Runtime.Commands;

/// <summary>
/// Builds the <c>moe</c> command tree. The <c>moe</c> tool and every recipe's generated entry point
/// host the same verbs; each verb lives in Commands/&lt;Verb&gt;/ as three files
/// (&lt;Verb&gt;CommandDefinition: options; &lt;Verb&gt;CommandParser: SetAction; &lt;Verb&gt;Command: behaviour).
/// </summary>
public static class MoeCommands
{
    /// <summary>Exit code for input the user must fix.</summary>
    public const int UserErrorExitCode = 2;

    public static RootCommand CreateRoot()
    {
        var root = new RootCommand("Moe: plan, check and run Mixture-of-Experts fine-tuning recipes (Megatron-Core semantics).");
        foreach (var verb in Verbs()) root.Subcommands.Add(verb);
        return root;
    }

    private static IEnumerable<Command> Verbs()
    {
        yield break;
    }

    /// <summary>Parses and runs, turning <see cref="UserError"/> into a message and exit code 2.</summary>
    public static int Run(RootCommand root, string[] args)
    {
        var parse = root.Parse(args);
        try
        {
            return parse.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (UserError e)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return UserErrorExitCode;
        }
    }
}
