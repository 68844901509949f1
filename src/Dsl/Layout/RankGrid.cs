using System;
using System.Collections.Generic;
using System.Globalization;
using System.Linq;

namespace Moe.Dsl.Layout;

/// <summary>
/// One of Megatron-Core's two rank grids (<c>RankGenerator</c> in parallel_state.py): the axes tp, cp, ep,
/// dp and pp in order-string order, the first varying fastest, so that
/// rank = Σ coordinate<sub>a</sub> · stride<sub>a</sub> with stride<sub>0</sub> = 1 and
/// stride<sub>a+1</sub> = stride<sub>a</sub> · size<sub>a</sub>.
/// </summary>
/// <remarks>
/// The dense grid has sizes (tp = TP, cp = CP, ep = 1, dp = DP, pp = PP), the expert grid
/// (tp = ETP, cp = 1, ep = EP, dp = EDP, pp = PP); both follow the same order string. A group family is an
/// orthogonal slice of one grid (<c>generate_masked_orthogonal_rank_groups</c>): the axes it names vary inside
/// a group, the others number the groups. Megatron 0.20's extra <c>gtp_remat</c> axis has size 1 by default
/// and changes no rank, so it is left out.
/// </remarks>
public sealed class RankGrid : IEquatable<RankGrid>
{
    /// <summary>The axis names Megatron's order strings use, in the dense order <c>tp-cp-ep-dp-pp</c>.</summary>
    public static IReadOnlyList<string> AxisNames { get; } = new[] { "tp", "cp", "ep", "dp", "pp" };

    private readonly GridAxis[] _axes;

    /// <summary>
    /// A grid from its axes, first fastest. Throws <see cref="ArgumentException"/> unless the axes are tp, cp, ep
    /// and then dp and pp in either order, each at least 1, with strides the prefix products of the sizes.
    /// </summary>
    public RankGrid(params GridAxis[] axes)
    {
        if (axes is null) throw new ArgumentNullException(nameof(axes));
        var names = axes.Select(a => a?.Name).ToArray();
        bool dpFirst = names.SequenceEqual(new[] { "tp", "cp", "ep", "dp", "pp" });
        if (!dpFirst && !names.SequenceEqual(new[] { "tp", "cp", "ep", "pp", "dp" }))
            throw new ArgumentException($"A rank grid has the axes tp, cp, ep, dp, pp (or tp, cp, ep, pp, dp) in that order, not {string.Join(", ", names)}.", nameof(axes));
        long stride = 1;
        foreach (var axis in axes)
        {
            if (axis.Size < 1) throw new ArgumentException($"Axis {axis.Name} has size {axis.Size}; every size is at least 1.", nameof(axes));
            if (axis.Stride != stride)
                throw new ArgumentException($"Axis {axis.Name} has stride {axis.Stride}, but the product of the sizes of the axes before it is {stride}.", nameof(axes));
            stride *= axis.Size;
            if (stride > int.MaxValue) throw new ArgumentException($"The grid has more than {int.MaxValue} ranks.", nameof(axes));
        }
        _axes = axes.ToArray();
        Size = (int)stride;
        Order = dpFirst ? RankOrder.TpCpEpDpPp : RankOrder.TpCpEpPpDp;
    }

    /// <summary>The grid of <paramref name="order"/> with sizes given by axis name (tp, cp, ep, dp, pp).</summary>
    public static RankGrid Of(RankOrder order, int tp, int cp, int ep, int dp, int pp)
    {
        var sizes = order == RankOrder.TpCpEpDpPp ? new[] { ("tp", tp), ("cp", cp), ("ep", ep), ("dp", dp), ("pp", pp) } : new[] { ("tp", tp), ("cp", cp), ("ep", ep), ("pp", pp), ("dp", dp) };
        var axes = new GridAxis[sizes.Length];
        long stride = 1;
        for (int i = 0; i < sizes.Length; i++)
        {
            if (stride > int.MaxValue) throw new ArgumentException($"The grid has more than {int.MaxValue} ranks.");
            axes[i] = new GridAxis(sizes[i].Item1, sizes[i].Item2, (int)stride);
            stride *= Math.Max(sizes[i].Item2, 1);
        }
        return new RankGrid(axes);
    }

    /// <summary>The axes in order-string order, first fastest.</summary>
    public IReadOnlyList<GridAxis> Axes => _axes;

    /// <summary>The number of ranks: the product of the sizes.</summary>
    public int Size { get; }

    /// <summary>The order string the axes follow.</summary>
    public RankOrder Order { get; }

    /// <summary>The axis called <paramref name="name"/> (tp, cp, ep, dp or pp).</summary>
    public GridAxis this[string name] => _axes.FirstOrDefault(a => a.Name == name)
        ?? throw new ArgumentException($"A rank grid has no axis '{name}'; its axes are tp, cp, ep, dp and pp.", nameof(name));

    /// <summary>The coordinate of <paramref name="rank"/> along axis <paramref name="name"/>: (rank / stride) mod size.</summary>
    public int Coordinate(string name, int rank)
    {
        var axis = this[name];
        return rank / axis.Stride % axis.Size;
    }

    /// <inheritdoc />
    public bool Equals(RankGrid? other) => other is not null && _axes.SequenceEqual(other._axes);

    /// <inheritdoc />
    public override bool Equals(object? obj) => Equals(obj as RankGrid);

    /// <inheritdoc />
    public override int GetHashCode() => _axes.Aggregate(17, (h, a) => unchecked(h * 31 + a.GetHashCode()));

    /// <summary>"tp 2 (stride 1), cp 1 (stride 2), …".</summary>
    public override string ToString() => string.Join(", ", _axes.Select(a =>
        a.Name + " " + a.Size.ToString(CultureInfo.InvariantCulture) + " (stride " + a.Stride.ToString(CultureInfo.InvariantCulture) + ")"));
}

/// <summary>One axis of a <see cref="RankGrid"/>.</summary>
/// <param name="Name">Megatron's token: tp, cp, ep, dp or pp (in the expert grid tp is the expert tensor-parallel axis and dp the expert data-parallel one).</param>
/// <param name="Size">How many coordinates the axis has.</param>
/// <param name="Stride">How far apart in rank two neighbours along the axis are.</param>
public sealed record GridAxis(string Name, int Size, int Stride);
