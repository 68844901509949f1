using System;
using System.Collections.Generic;
using System.Linq;

namespace Moe.Dsl.Planning;

/// <summary>A GPU model the planner knows: its memory (HBM).</summary>
public sealed record GpuSpec(string Name, double MemoryGB)
{
    /// <summary>NVIDIA H100 SXM, 80 GB.</summary>
    public static GpuSpec H100 { get; } = new("H100", 80);

    /// <summary>NVIDIA H200, 141 GB.</summary>
    public static GpuSpec H200 { get; } = new("H200", 141);

    /// <summary>NVIDIA A100, 80 GB.</summary>
    public static GpuSpec A100 { get; } = new("A100", 80);

    /// <summary>NVIDIA A100, 40 GB.</summary>
    public static GpuSpec A100_40 { get; } = new("A100-40", 40);

    /// <summary>NVIDIA B200, 180 GB.</summary>
    public static GpuSpec B200 { get; } = new("B200", 180);

    /// <summary>Every GPU the planner knows.</summary>
    public static IReadOnlyList<GpuSpec> All { get; } = new[] { H100, H200, A100, A100_40, B200 };

    /// <summary>The spec of a recipe's <see cref="Moe.Dsl.Gpu"/>.</summary>
    public static GpuSpec Of(Gpu gpu) => gpu switch
    {
        Gpu.H100 => H100,
        Gpu.H200 => H200,
        Gpu.A100 => A100,
        Gpu.A100_40 => A100_40,
        Gpu.B200 => B200,
        _ => throw new ArgumentOutOfRangeException(nameof(gpu), gpu, "not a GPU the planner knows"),
    };

    /// <summary>The <see cref="Moe.Dsl.Gpu"/> member of this spec ("A100-40" is <see cref="Gpu.A100_40"/>).</summary>
    public Gpu Member => (Gpu)Enum.Parse(typeof(Gpu), Name.Replace('-', '_'));

    /// <summary>Finds a GPU by name, ignoring case ("h200").</summary>
    public static GpuSpec? Find(string name) => All.FirstOrDefault(g => string.Equals(g.Name, name, StringComparison.OrdinalIgnoreCase));
}
