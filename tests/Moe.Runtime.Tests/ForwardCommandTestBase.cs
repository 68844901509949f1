using Moe.Runtime.Checkpoints;
using Moe.Runtime.Commands;
using Moe.Tests;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>What the `moe forward` test classes share: a temporary folder, the fixture, running the verb, input files.</summary>
public abstract class ForwardCommandTestBase : IDisposable
{
    protected ForwardCommandTestBase(string prefix) => Dir = Directory.CreateTempSubdirectory(prefix).FullName;

    /// <summary>The test's own temporary folder, deleted afterwards.</summary>
    protected string Dir { get; }

    public void Dispose() => Directory.Delete(Dir, recursive: true);

    protected static string Fixture => TestPaths.Fixture("mixtral-tiny");

    /// <summary>Runs `moe` as the command line does: exit code and standard error.</summary>
    protected static (int Exit, string Err) Run(params string[] args)
    {
        var (exit, _, err) = ConsoleCapture.Run(() => MoeCommands.Run(MoeCommands.CreateRoot(), args));
        return (exit, err);
    }

    /// <summary>The fixture's input_ids [2, 32].</summary>
    protected static Tensor FixtureIds()
    {
        using var expected = SafetensorsFile.Open(Path.Combine(Fixture, "expected.safetensors"));
        return expected.Read("input_ids");
    }

    /// <summary>Writes <paramref name="ids"/> as a `--input` file named <paramref name="name"/> in <see cref="Dir"/>.</summary>
    protected string Input(string name, Tensor ids)
    {
        string path = Path.Combine(Dir, name);
        SafetensorsFile.Write(path, [new("input_ids", ids)]);
        return path;
    }
}
