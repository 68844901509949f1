using System.Runtime.InteropServices;

namespace Moe.Runtime.Distributed.Nccl;

/// <summary>ncclResult_t.</summary>
internal enum NcclResult
{
    Success = 0,
    UnhandledCudaError = 1,
    SystemError = 2,
    InternalError = 3,
    InvalidArgument = 4,
    InvalidUsage = 5,
    RemoteError = 6,
    InProgress = 7,
    Timeout = 8,
}

/// <summary>ncclDataType_t.</summary>
internal enum NcclDataType
{
    Int8 = 0,
    Uint8 = 1,
    Int32 = 2,
    Uint32 = 3,
    Int64 = 4,
    Uint64 = 5,
    Float16 = 6,
    Float32 = 7,
    Float64 = 8,
    Bfloat16 = 9,
}

/// <summary>ncclRedOp_t (the built-in operations).</summary>
internal enum NcclRedOp
{
    Sum = 0,
    Prod = 1,
    Max = 2,
    Min = 3,
    Avg = 4,
}

/// <summary>ncclUniqueId: 128 opaque bytes, passed by value to ncclCommInitRankConfig.</summary>
[StructLayout(LayoutKind.Sequential, Size = 128)]
internal unsafe struct NcclUniqueIdBytes
{
    public fixed byte Internal[128];
}

/// <summary>
/// ncclConfig_t as NCCL 2.28 lays it out (nccl.h of v2.28.9-1): the library reads as many fields as
/// <see cref="Size"/> says, so this mirrors that version exactly and leaves every customisable field unset
/// (INT_MIN / NULL) but the ones set here.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct NcclConfig
{
    public nuint Size;
    public uint Magic;
    public uint Version;
    public int Blocking;
    public int CgaClusterSize;
    public int MinCTAs;
    public int MaxCTAs;
    public IntPtr NetName;
    public int SplitShare;
    public int TrafficClass;
    public IntPtr CommName;
    public int CollnetEnable;
    public int CTAPolicy;
    public int ShrinkShare;
    public int NvlsCTAs;
    public int NChannelsPerNetPeer;
    public int NvlinkCentricSched;

    public const int Undefined = int.MinValue;

    /// <summary>NCCL_CONFIG_INITIALIZER for 2.28, non-blocking (so a stuck operation can be aborted) unless asked otherwise.</summary>
    public static NcclConfig Create(bool blocking = false) => new()
    {
        Size = (nuint)Marshal.SizeOf<NcclConfig>(),
        Magic = 0xcafebeef,
        Version = 22809,
        Blocking = blocking ? 1 : 0,
        CgaClusterSize = Undefined,
        MinCTAs = Undefined,
        MaxCTAs = Undefined,
        NetName = IntPtr.Zero,
        SplitShare = Undefined,
        TrafficClass = Undefined,
        CommName = IntPtr.Zero,
        CollnetEnable = Undefined,
        CTAPolicy = Undefined,
        ShrinkShare = Undefined,
        NvlsCTAs = Undefined,
        NChannelsPerNetPeer = Undefined,
        NvlinkCentricSched = Undefined,
    };
}

/// <summary>
/// The NCCL C API, bound at run time to the libnccl.so.2 this process uses (the one libtorch already loaded,
/// else MOE_NCCL_LIB, else the loader's search path), so that Moe and libtorch share one copy. The functions
/// are resolved by name once; nothing here allocates per call.
/// </summary>
internal sealed unsafe class NcclNative
{
    public delegate* unmanaged<int*, NcclResult> GetVersion;
    public delegate* unmanaged<NcclUniqueIdBytes*, NcclResult> GetUniqueId;
    public delegate* unmanaged<IntPtr*, int, NcclUniqueIdBytes, int, NcclConfig*, NcclResult> CommInitRankConfig;
    public delegate* unmanaged<IntPtr, int, int, IntPtr*, NcclConfig*, NcclResult> CommSplit;
    public delegate* unmanaged<IntPtr, NcclResult> CommFinalize;
    public delegate* unmanaged<IntPtr, NcclResult> CommDestroy;
    public delegate* unmanaged<IntPtr, NcclResult> CommAbort;
    public delegate* unmanaged<IntPtr, NcclResult*, NcclResult> CommGetAsyncError;
    public delegate* unmanaged<NcclResult, IntPtr> GetErrorString;
    public delegate* unmanaged<IntPtr, IntPtr> GetLastError;
    public delegate* unmanaged<IntPtr, IntPtr, nuint, NcclDataType, NcclRedOp, IntPtr, IntPtr, NcclResult> AllReduce;
    public delegate* unmanaged<IntPtr, IntPtr, nuint, NcclDataType, int, IntPtr, IntPtr, NcclResult> Broadcast;
    public delegate* unmanaged<IntPtr, IntPtr, nuint, NcclDataType, NcclRedOp, IntPtr, IntPtr, NcclResult> ReduceScatter;
    public delegate* unmanaged<IntPtr, IntPtr, nuint, NcclDataType, IntPtr, IntPtr, NcclResult> AllGather;
    public delegate* unmanaged<IntPtr, nuint, NcclDataType, int, IntPtr, IntPtr, NcclResult> Send;
    public delegate* unmanaged<IntPtr, nuint, NcclDataType, int, IntPtr, IntPtr, NcclResult> Recv;
    public delegate* unmanaged<NcclResult> GroupStart;
    public delegate* unmanaged<NcclResult> GroupEnd;

    private NcclNative(IntPtr lib, string path)
    {
        Path = path;
        IntPtr E(string name) => NativeLibrary.GetExport(lib, name);
        GetVersion = (delegate* unmanaged<int*, NcclResult>)E("ncclGetVersion");
        GetUniqueId = (delegate* unmanaged<NcclUniqueIdBytes*, NcclResult>)E("ncclGetUniqueId");
        CommInitRankConfig = (delegate* unmanaged<IntPtr*, int, NcclUniqueIdBytes, int, NcclConfig*, NcclResult>)E("ncclCommInitRankConfig");
        CommSplit = (delegate* unmanaged<IntPtr, int, int, IntPtr*, NcclConfig*, NcclResult>)E("ncclCommSplit");
        CommFinalize = (delegate* unmanaged<IntPtr, NcclResult>)E("ncclCommFinalize");
        CommDestroy = (delegate* unmanaged<IntPtr, NcclResult>)E("ncclCommDestroy");
        CommAbort = (delegate* unmanaged<IntPtr, NcclResult>)E("ncclCommAbort");
        CommGetAsyncError = (delegate* unmanaged<IntPtr, NcclResult*, NcclResult>)E("ncclCommGetAsyncError");
        GetErrorString = (delegate* unmanaged<NcclResult, IntPtr>)E("ncclGetErrorString");
        GetLastError = (delegate* unmanaged<IntPtr, IntPtr>)E("ncclGetLastError");
        AllReduce = (delegate* unmanaged<IntPtr, IntPtr, nuint, NcclDataType, NcclRedOp, IntPtr, IntPtr, NcclResult>)E("ncclAllReduce");
        Broadcast = (delegate* unmanaged<IntPtr, IntPtr, nuint, NcclDataType, int, IntPtr, IntPtr, NcclResult>)E("ncclBroadcast");
        ReduceScatter = (delegate* unmanaged<IntPtr, IntPtr, nuint, NcclDataType, NcclRedOp, IntPtr, IntPtr, NcclResult>)E("ncclReduceScatter");
        AllGather = (delegate* unmanaged<IntPtr, IntPtr, nuint, NcclDataType, IntPtr, IntPtr, NcclResult>)E("ncclAllGather");
        Send = (delegate* unmanaged<IntPtr, nuint, NcclDataType, int, IntPtr, IntPtr, NcclResult>)E("ncclSend");
        Recv = (delegate* unmanaged<IntPtr, nuint, NcclDataType, int, IntPtr, IntPtr, NcclResult>)E("ncclRecv");
        GroupStart = (delegate* unmanaged<NcclResult>)E("ncclGroupStart");
        GroupEnd = (delegate* unmanaged<NcclResult>)E("ncclGroupEnd");
        int version;
        Check(GetVersion(&version), "ncclGetVersion");
        Version = version;
    }

    /// <summary>The file the library was loaded from.</summary>
    public string Path { get; }

    /// <summary>NCCL_VERSION_CODE of the loaded library, e.g. 22809.</summary>
    public int Version { get; }

    /// <summary>"2.28.9".</summary>
    public string VersionText => $"{Version / 10000}.{Version / 100 % 100}.{Version % 100}";

    private static NcclNative? _loaded;
    private static readonly object LoadLock = new();

    /// <summary>The NCCL library of this process (loaded once; the process has one), or a <see cref="UserError"/> saying where it looked.</summary>
    public static NcclNative Load()
    {
        lock (LoadLock)
        {
            if (_loaded is not null) return _loaded;
            var tried = new List<string>();
            foreach (var candidate in Candidates())
            {
                tried.Add(candidate);
                if (NativeLibrary.TryLoad(candidate, out var lib))
                {
                    var native = new NcclNative(lib, candidate);
                    if (native.Version < 22800)
                        throw new UserError($"NCCL {native.VersionText} at {candidate} is older than 2.28, whose communicator configuration Moe mirrors; point MOE_NCCL_LIB at libnccl.so.2 of NCCL 2.28 or newer (PyTorch 2.11's pip NCCL is 2.28.9).");
                    return _loaded = native;
                }
            }
            throw new UserError("NCCL (libnccl.so.2) was not found: tried " + string.Join(", ", tried) +
                ". Install PyTorch with CUDA (its pip package nvidia-nccl-cu* carries it), start through the GPU bundle's run script, or set MOE_NCCL_LIB to the library's path.");
        }
    }

    private static IEnumerable<string> Candidates()
    {
        if (Environment.GetEnvironmentVariable("MOE_NCCL_LIB") is { Length: > 0 } env) { yield return env; yield break; }
        // The copy libtorch_cuda already mapped, so both use one NCCL.
        if (File.Exists("/proc/self/maps"))
        {
            var mapped = File.ReadLines("/proc/self/maps").Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries))
                .Where(f => f.Length >= 6).Select(f => f[^1]).FirstOrDefault(p => System.IO.Path.GetFileName(p).StartsWith("libnccl.so", StringComparison.Ordinal));
            if (mapped is not null) yield return mapped;
        }
        yield return "libnccl.so.2";
    }

    /// <summary>Throws when <paramref name="result"/> is an error (not success, not in progress).</summary>
    public void Check(NcclResult result, string call, IntPtr comm = default)
    {
        if (result is NcclResult.Success or NcclResult.InProgress) return;
        throw new NcclException(result, $"{call} failed: {Describe(result, comm)}");
    }

    /// <summary>NCCL's text for an error, with the communicator's last error message when there is one.</summary>
    public string Describe(NcclResult result, IntPtr comm = default)
    {
        string text = Marshal.PtrToStringAnsi(GetErrorString(result)) ?? result.ToString();
        string? last = comm == IntPtr.Zero ? null : Marshal.PtrToStringAnsi(GetLastError(comm));
        return string.IsNullOrEmpty(last) ? $"{result} ({text})" : $"{result} ({text}): {last}";
    }
}

/// <summary>An NCCL call failed.</summary>
public sealed class NcclException : Exception
{
    internal NcclException(NcclResult result, string message) : base(message) => Result = (int)result;

    /// <summary>The ncclResult_t value.</summary>
    public int Result { get; }
}
