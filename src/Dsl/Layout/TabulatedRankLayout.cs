using System;
using System.Collections.Generic;
using System.Linq;

namespace Moe.Dsl.Layout;

/// <summary>
/// A rank layout read from tables: every group of every family, each rank's coordinates and the creation runs,
/// as a generated wiring lists them for a small world (or as a Megatron rank vector records them). Answers
/// <see cref="IRankLayout"/> from the tables alone; nothing is recomputed.
/// </summary>
/// <remarks>
/// The constructor checks that the tables are whole (every family of <see cref="RankLayout.FamilyKeys"/> once,
/// ranks in range, no rank twice in one family, a coordinate row per rank) and builds a rank → group index per
/// family, O(World × families); it does not check the tables against Megatron's rules, which is what the tests
/// comparing them with <see cref="RankLayout"/> and Megatron's vectors do.
/// </remarks>
public sealed class TabulatedRankLayout : IRankLayout
{
    private readonly Dictionary<string, (int[][] Groups, int[] GroupOfRank)> _families;
    private readonly RankCoordinates[] _coordinates;

    /// <summary>
    /// A layout from its tables; throws <see cref="ArgumentException"/> naming the first table that is not whole
    /// or the sizes that do not divide <paramref name="world"/>.
    /// </summary>
    /// <param name="world">World size.</param>
    /// <param name="tensor">Tensor-parallel size.</param>
    /// <param name="pipeline">Pipeline-parallel size.</param>
    /// <param name="context">Context-parallel size.</param>
    /// <param name="expert">Expert-parallel size.</param>
    /// <param name="expertTensor">Expert tensor-parallel size.</param>
    /// <param name="order">Rank order.</param>
    /// <param name="families">Each family by its key with its groups, members in Megatron's order.</param>
    /// <param name="coordinates">Each rank's coordinates, indexed by rank.</param>
    /// <param name="creationOrder">The communicator creation runs.</param>
    public TabulatedRankLayout(int world, int tensor, int pipeline, int context, int expert, int expertTensor, RankOrder order,
        IReadOnlyList<(string Key, int[][] Groups)> families, IReadOnlyList<RankCoordinates> coordinates, IReadOnlyList<GroupCreation> creationOrder)
    {
        if (families is null) throw new ArgumentNullException(nameof(families));
        if (coordinates is null) throw new ArgumentNullException(nameof(coordinates));
        if (creationOrder is null) throw new ArgumentNullException(nameof(creationOrder));
        if (world < 1 || tensor < 1 || pipeline < 1 || context < 1 || expert < 1 || expertTensor < 1)
            throw new ArgumentException("Every parallel size must be at least 1.");
        if (world % ((long)tensor * pipeline * context) != 0 || world % ((long)expertTensor * expert * pipeline) != 0)
            throw new ArgumentException($"World size {world} is not divisible by tp·pp·cp = {(long)tensor * pipeline * context} and etp·ep·pp = {(long)expertTensor * expert * pipeline}.");
        World = world;
        Tensor = tensor;
        Pipeline = pipeline;
        Context = context;
        Expert = expert;
        ExpertTensor = expertTensor;
        Order = order;
        DataParallel = world / (tensor * pipeline * context);
        ExpertDataParallel = world / (expertTensor * expert * pipeline);

        _families = new Dictionary<string, (int[][], int[])>(StringComparer.Ordinal);
        foreach (var (key, groups) in families)
        {
            if (!RankLayout.FamilyKeys.Contains(key)) throw RankLayout.UnknownFamily(key);
            if (_families.ContainsKey(key)) throw new ArgumentException($"Family {key} is listed twice.", nameof(families));
            if (groups is null || groups.Length == 0 || groups.Any(g => g is null || g.Length == 0))
                throw new ArgumentException($"Family {key} has no groups or an empty group.", nameof(families));
            var groupOfRank = Enumerable.Repeat(-1, world).ToArray();
            for (int g = 0; g < groups.Length; g++)
                foreach (int rank in groups[g])
                {
                    if (rank < 0 || rank >= world) throw new ArgumentException($"Family {key}, group {g}: rank {rank} is not in 0..{world - 1}.", nameof(families));
                    if (groupOfRank[rank] >= 0) throw new ArgumentException($"Family {key}: rank {rank} is in group {groupOfRank[rank]} and in group {g}.", nameof(families));
                    groupOfRank[rank] = g;
                }
            _families.Add(key, (groups.Select(g => g.ToArray()).ToArray(), groupOfRank));
        }
        var missing = RankLayout.FamilyKeys.Where(k => !_families.ContainsKey(k)).ToArray();
        if (missing.Length > 0) throw new ArgumentException($"Families missing: {string.Join(", ", missing)}.", nameof(families));
        if (coordinates.Count != world) throw new ArgumentException($"{coordinates.Count} coordinate rows for {world} ranks.", nameof(coordinates));
        _coordinates = coordinates.ToArray();
        int without = Array.IndexOf(_coordinates, null);
        if (without >= 0) throw new ArgumentException($"Rank {without} has no coordinates.", nameof(coordinates));
        CreationOrder = creationOrder.ToArray();
    }

    /// <inheritdoc />
    public int World { get; }

    /// <inheritdoc />
    public int Tensor { get; }

    /// <inheritdoc />
    public int Pipeline { get; }

    /// <inheritdoc />
    public int Context { get; }

    /// <inheritdoc />
    public int Expert { get; }

    /// <inheritdoc />
    public int ExpertTensor { get; }

    /// <inheritdoc />
    public int DataParallel { get; }

    /// <inheritdoc />
    public int ExpertDataParallel { get; }

    /// <inheritdoc />
    public RankOrder Order { get; }

    /// <inheritdoc />
    public IReadOnlyList<GroupCreation> CreationOrder { get; }

    /// <inheritdoc />
    public int GroupCount(string family) => Get(family).Groups.Length;

    /// <inheritdoc />
    public int[] Group(string family, int index)
    {
        var groups = Get(family).Groups;
        if (index < 0 || index >= groups.Length)
            throw new ArgumentOutOfRangeException(nameof(index), index, $"Family {family} has {groups.Length} groups.");
        return groups[index].ToArray();
    }

    /// <inheritdoc />
    public int GroupIndexOf(string family, int rank)
    {
        var f = Get(family);
        CheckRank(rank);
        return f.GroupOfRank[rank];
    }

    /// <inheritdoc />
    public int[] GroupOf(string family, int rank)
    {
        int index = GroupIndexOf(family, rank);
        return index < 0 ? Array.Empty<int>() : Get(family).Groups[index].ToArray();
    }

    /// <inheritdoc />
    public RankCoordinates Coordinates(int rank)
    {
        CheckRank(rank);
        return _coordinates[rank];
    }

    private (int[][] Groups, int[] GroupOfRank) Get(string family) =>
        family is not null && _families.TryGetValue(family, out var f) ? f : throw RankLayout.UnknownFamily(family);

    private void CheckRank(int rank)
    {
        if (rank < 0 || rank >= World) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"Ranks are 0 to {World - 1}.");
    }
}
