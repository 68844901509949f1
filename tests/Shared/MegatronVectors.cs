using System.Text.Json;
using Moe.Dsl.Layout;

namespace Moe.Tests;

/// <summary>
/// Megatron-Core 0.20's own rank layouts (shared/vectors/megatron-ranks, recorded from initialize_model_parallel)
/// read into <see cref="TabulatedRankLayout"/>s: expected layouts that none of our layout code produced.
/// </summary>
internal static class MegatronVectors
{
    public static string Folder => Path.Combine(TestPaths.Shared, "vectors", "megatron-ranks");

    /// <summary>The vector file names, ordinal order.</summary>
    public static string[] Files() => Directory.GetFiles(Folder, "*.json").Select(Path.GetFileName).OrderBy(f => f, StringComparer.Ordinal).ToArray()!;

    /// <summary>The vector's layout; throws when its recorded dp or edp disagrees with its sizes.</summary>
    public static TabulatedRankLayout Load(string file)
    {
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(Folder, file)));
        var v = json.RootElement;
        int Size(string name) => v.GetProperty(name).GetInt32();
        var order = RankLayout.ParseOrder(v.GetProperty("order").GetString()!) ?? throw new InvalidDataException($"{file}: unknown order");
        var families = v.GetProperty("groups").EnumerateObject()
            .Select(f => (f.Name, f.Value.EnumerateArray().Select(g => g.EnumerateArray().Select(r => r.GetInt32()).ToArray()).ToArray()))
            .ToArray();
        var coordinates = v.GetProperty("coords").EnumerateArray().Select(c => new RankCoordinates(
            c.GetProperty("tp").GetInt32(), c.GetProperty("cp").GetInt32(), c.GetProperty("dp").GetInt32(), c.GetProperty("pp").GetInt32(),
            c.GetProperty("dp_cp").GetInt32(), c.GetProperty("ep").GetInt32(), c.GetProperty("etp").GetInt32(), c.GetProperty("edp").GetInt32())).ToArray();
        var creation = v.GetProperty("creation_order").EnumerateArray().Select(c => new GroupCreation(
            c[0].GetString()!, c[1].GetString()!, c[2].GetString()!, c[3].GetInt32(), c[4].GetInt32())).ToArray();
        var layout = new TabulatedRankLayout(Size("world"), Size("tp"), Size("pp"), Size("cp"), Size("ep"), Size("etp"), order, families, coordinates, creation);
        if (layout.DataParallel != Size("dp") || layout.ExpertDataParallel != Size("edp"))
            throw new InvalidDataException($"{file}: dp {Size("dp")} and edp {Size("edp")} recorded, {layout.DataParallel} and {layout.ExpertDataParallel} from the sizes");
        return layout;
    }
}
