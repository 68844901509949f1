using System.CommandLine;

namespace Moe.Runtime.Commands.Preprocess;

/// <summary>Options of <c>moe preprocess</c> (Megatron's tools/preprocess_data.py).</summary>
public sealed class PreprocessCommandDefinition
{
    public const string Name = "preprocess";

    public PreprocessCommandDefinition()
    {
        Command = new Command(Name, "Tokenize JSON lines into Megatron indexed datasets (<prefix>_<key>_document.bin/.idx), byte-identical to Megatron-Core's preprocess_data.py.");
        Input = new Option<string>("--input") { Description = "JSON-lines file, one document (or SFT record) per line.", Required = true };
        Tokenizer = new Option<string>("--tokenizer") { Description = "SentencePiece tokenizer.model or Hugging Face tokenizer.json.", Required = true };
        OutputPrefix = new Option<string>("--output-prefix") { Description = "Output path prefix; writes <prefix>_<key>_document.bin/.idx.", Required = true };
        JsonKeys = new Option<string[]>("--json-keys") { Description = "Keys to tokenize, one dataset each (default: text).", DefaultValueFactory = _ => ["text"], AllowMultipleArgumentsPerToken = true };
        AppendEod = new Option<bool>("--append-eod") { Description = "Append the end-of-document id after each document." };
        Sft = new Option<bool>("--sft") { Description = "Records are {\"input\": prompt, \"output\": answer}: writes <prefix>_text_document (prompt + answer + EOD) and <prefix>_lossmask_document (1 on answer and EOD tokens)." };
        Workers = new Option<int>("--workers") { Description = "Tokenizer threads (output order is preserved).", DefaultValueFactory = _ => Environment.ProcessorCount };
        OnError = new Option<string>("--on-error") { Description = "fail (default): stop at the first malformed line; skip: skip it, count it and report.", DefaultValueFactory = _ => "fail" };
        OnError.AcceptOnlyFromAmong("fail", "skip");
        foreach (var o in new Option[] { Input, Tokenizer, OutputPrefix, JsonKeys, AppendEod, Sft, Workers, OnError }) Command.Options.Add(o);
    }

    public Command Command { get; }
    public Option<string> Input { get; }
    public Option<string> Tokenizer { get; }
    public Option<string> OutputPrefix { get; }
    public Option<string[]> JsonKeys { get; }
    public Option<bool> AppendEod { get; }
    public Option<bool> Sft { get; }
    public Option<int> Workers { get; }
    public Option<string> OnError { get; }
}
