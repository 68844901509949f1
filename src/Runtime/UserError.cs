namespace Moe.Runtime;

/// <summary>
/// An error the user can fix (bad input, a missing file, an invalid layout). Verbs throw it with a
/// message that says what is wrong, where, and how to fix it; the command host prints the message
/// (no stack trace) and exits with code 2.
/// </summary>
public sealed class UserError : Exception
{
    public UserError(string message) : base(message) { }
    public UserError(string message, Exception inner) : base(message, inner) { }
}
