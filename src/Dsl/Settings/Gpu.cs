namespace Moe.Dsl;

/// <summary>
/// The GPU a recipe runs on. The plan and the memory rule (MOE0301) check the per-GPU estimate against
/// its memory (<see cref="Planning.GpuSpec.Of"/>). Megatron has no such flag: it finds out by running out of memory.
/// </summary>
public enum Gpu
{
    /// <summary>NVIDIA H100 SXM, 80 GB of HBM3.</summary>
    H100,

    /// <summary>NVIDIA H200, 141 GB of HBM3e.</summary>
    H200,

    /// <summary>NVIDIA A100, 80 GB.</summary>
    A100,

    /// <summary>NVIDIA A100, 40 GB.</summary>
    A100_40,

    /// <summary>NVIDIA B200, 180 GB.</summary>
    B200,
}
