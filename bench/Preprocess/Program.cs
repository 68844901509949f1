// Preprocessing throughput: tokenizes a JSON-lines corpus (default: the tokenizer fixture's documents
// repeated to ~20 MB) with 1..N workers and prints tokens/s and tokens/s per core. Not a test.
// Usage: dotnet run -c Release --project bench/Preprocess -- [tokenizer.model] [docs.jsonl] [copies]
using System.Diagnostics;
using Moe.Runtime.Commands.Preprocess;

string shared = Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "../../../../../../shared/fixtures/tokenizer-bpe-1k"));
string tokenizer = args.Length > 0 ? args[0] : Path.Combine(shared, "tokenizer.model");
string docs = args.Length > 1 ? args[1] : Path.Combine(shared, "docs.jsonl");
int copies = args.Length > 2 ? int.Parse(args[2]) : 200;
string dir = Directory.CreateTempSubdirectory("moe-bench-pre-").FullName;
string corpus = Path.Combine(dir, "corpus.jsonl");
var lines = File.ReadAllLines(docs);
File.WriteAllLines(corpus, Enumerable.Range(0, copies).SelectMany(_ => lines));
Console.WriteLine($"corpus: {lines.Length * copies} documents, {new FileInfo(corpus).Length / 1e6:F1} MB; {Environment.ProcessorCount} cores");
foreach (int workers in Enumerable.Range(1, Environment.ProcessorCount))
{
    var watch = Stopwatch.StartNew();
    var r = PreprocessCommand.Execute(new(corpus, tokenizer, Path.Combine(dir, "out"), ["text"], true, false, workers, false), TextWriter.Null);
    double s = watch.Elapsed.TotalSeconds;
    Console.WriteLine($"workers {workers}: {r.Tokens / s:F0} tokens/s, {r.Tokens / s / workers:F0} tokens/s per core, {r.Documents / s:F0} documents/s");
}
Directory.Delete(dir, recursive: true);
