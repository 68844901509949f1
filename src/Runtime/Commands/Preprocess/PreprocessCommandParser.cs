using System.CommandLine;

namespace Moe.Runtime.Commands.Preprocess;

/// <summary>Binds <c>moe preprocess</c> to <see cref="PreprocessCommand"/>.</summary>
public static class PreprocessCommandParser
{
    public static Command Create()
    {
        var d = new PreprocessCommandDefinition();
        d.Command.SetAction(parse => PreprocessCommand.Execute(new PreprocessCommand.Request(
            parse.GetValue(d.Input)!, parse.GetValue(d.Tokenizer)!, parse.GetValue(d.OutputPrefix)!, parse.GetValue(d.JsonKeys)!,
            parse.GetValue(d.AppendEod), parse.GetValue(d.Sft), parse.GetValue(d.Workers), parse.GetValue(d.OnError) == "skip"), Console.Error).Exit);
        return d.Command;
    }
}
