using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

/// <summary>
/// Gradients our managed autograd functions (<see cref="MixtureOfExperts.GroupedSwiGlu"/>,
/// <see cref="RotaryQkv"/>) return to autograd. TorchSharp keeps a handle on each, and autograd holds its
/// own reference, so the handle is kept here and released by the next such function on the same thread
/// or by <see cref="Release"/>: the engine can then free the buffer once it has used it.
/// </summary>
/// <remarks>
/// Per thread: autograd reads a returned handle after the function has returned, so only the thread that
/// runs the backward (the caller's on CPU, the engine's device thread on CUDA) may release it; a release
/// from another thread could race a backward still running there. On CUDA the last gradient of a step
/// (RoPE's, [B·S, (Nq + 2·Nkv)·d]: 50 MB for 8x7B at 4096 tokens) is held until the next backward.
/// </remarks>
public static class HandedBackGradients
{
    [ThreadStatic] private static List<Tensor>? _handles;

    /// <summary>Takes <paramref name="gradient"/> out of its dispose scope and keeps its handle until <see cref="Release"/> on this thread.</summary>
    public static Tensor Keep(Tensor gradient)
    {
        gradient.DetachFromDisposeScope();
        (_handles ??= new List<Tensor>()).Add(gradient);
        return gradient;
    }

    /// <summary>Drops the handles this thread kept (call after <c>backward()</c> to free those buffers at once).</summary>
    public static void Release()
    {
        if (_handles is null) return;
        foreach (var t in _handles) t.Dispose();
        _handles.Clear();
    }
}
