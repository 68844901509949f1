using System.Collections.Generic;

namespace Moe.Dsl;

/// <summary>
/// The NCCL environment users set today in launch scripts, typed. Each set value becomes the
/// environment variable named in its docs before the first communicator is created.
/// </summary>
public sealed record Nccl
{
    /// <summary>InfiniBand adapters to use, e.g. "mlx5". Sets <c>NCCL_IB_HCA</c>.</summary>
    public string? IbHca { get; init; }

    /// <summary>RoCE/IB GID index, e.g. 3. Sets <c>NCCL_IB_GID_INDEX</c>.</summary>
    public int? IbGidIndex { get; init; }

    /// <summary>Network interface for bootstrap and sockets, e.g. "eth0". Sets <c>NCCL_SOCKET_IFNAME</c>.</summary>
    public string? SocketInterface { get; init; }

    /// <summary>Log level. Sets <c>NCCL_DEBUG</c>.</summary>
    public NcclDebug? DebugLevel { get; init; }

    /// <summary>Collective algorithm(s), e.g. "Tree" or "Ring". Sets <c>NCCL_ALGO</c>.</summary>
    public string? Algorithm { get; init; }

    /// <summary>The environment variables this setting stands for, in a fixed order.</summary>
    public IReadOnlyList<KeyValuePair<string, string>> ToEnvironment()
    {
        var env = new List<KeyValuePair<string, string>>();
        if (IbHca is not null) env.Add(new("NCCL_IB_HCA", IbHca));
        if (IbGidIndex is int gid) env.Add(new("NCCL_IB_GID_INDEX", gid.ToString(System.Globalization.CultureInfo.InvariantCulture)));
        if (SocketInterface is not null) env.Add(new("NCCL_SOCKET_IFNAME", SocketInterface));
        if (DebugLevel is NcclDebug level) env.Add(new("NCCL_DEBUG", level.ToString().ToUpperInvariant()));
        if (Algorithm is not null) env.Add(new("NCCL_ALGO", Algorithm));
        return env;
    }
}
