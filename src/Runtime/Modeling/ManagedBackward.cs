using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

/// <summary>
/// What our managed autograd functions (<see cref="MixtureOfExperts.GroupedSwiGlu"/>, <see cref="RotaryQkv"/>)
/// need around their backward: the handles of the gradients they return, and a failure inside them.
/// Call <see cref="Complete"/> after every <c>backward()</c>.
/// </summary>
/// <remarks>
/// <para>
/// Handles: TorchSharp keeps a handle on each gradient a managed backward returns, and autograd holds its own
/// reference, so the handle is kept here and released by the next such function on the same thread or by
/// <see cref="Complete"/>: the engine can then free the buffer once it has used it. Per thread: autograd reads
/// a returned handle after the function has returned, so only the thread that ran it may drop it (a release
/// from another thread could race a backward still running there). On CUDA the last gradient of a step (RoPE's,
/// 50 MB for 8x7B at 4096 tokens) is held until the next backward.
/// </para>
/// <para>
/// Failures: a managed backward is called from libtorch's engine, where an exception cannot cross back into
/// native code (the process would end with .NET's unhandled-exception report). So a failure — CUDA out of
/// memory, an input modified in place after the forward — is recorded, the function returns no gradients, and
/// <see cref="Complete"/> (or the next forward of such a function) throws it.
/// </para>
/// </remarks>
public static class ManagedBackward
{
    [ThreadStatic] private static List<Tensor>? _handles;
    [ThreadStatic] private static bool _runsForwards;
    [ThreadStatic] private static Exception? _threadFailure;
    private static Exception? _engineFailure;

    /// <summary>
    /// Call at the start of each forward of a managed function: releases this thread's handles and throws a
    /// failure not yet reported. Marks the thread as one that runs forwards, so a backward failing on it (CPU:
    /// autograd runs the backward on the caller's thread) is reported to it alone, not to another thread.
    /// </summary>
    public static void BeforeForward()
    {
        _runsForwards = true;
        Release();
        ThrowIfFailed();
    }

    /// <summary>Takes <paramref name="gradient"/> out of its dispose scope and keeps its handle until released on this thread.</summary>
    public static Tensor Keep(Tensor gradient)
    {
        gradient.DetachFromDisposeScope();
        (_handles ??= new List<Tensor>()).Add(gradient);
        return gradient;
    }

    /// <summary>Drops the handles this thread kept.</summary>
    public static void Release()
    {
        if (_handles is null) return;
        foreach (var t in _handles) t.Dispose();
        _handles.Clear();
    }

    /// <summary>
    /// Runs a managed backward: releases this thread's earlier handles, then calls <paramref name="body"/> in a
    /// dispose scope with the saved tensors and a contiguous upstream gradient, and drops their handles after.
    /// The body returns one entry per forward argument, the gradients passed through <see cref="Keep"/>. A
    /// failure is recorded and <paramref name="inputs"/> nulls are returned instead.
    /// </summary>
    public static List<Tensor> Run(string function, int inputs, torch.autograd.AutogradContext ctx, Tensor gradOutput,
        Func<IReadOnlyList<Tensor>, Tensor, List<Tensor>> body)
    {
        Release();
        try
        {
            using var scope = torch.NewDisposeScope();
            var saved = ctx.get_saved_variables();
            // Kernels and torch._grouped_mm need dense strides (the gradient of a sum arrives expanded).
            return body(saved, gradOutput.is_contiguous() ? gradOutput : gradOutput.contiguous());
        }
        catch (Exception e)
        {
            var failure = new UserError($"The backward of {function} failed: {e.Message}", e);
            if (_runsForwards) _threadFailure ??= failure;
            else Interlocked.CompareExchange(ref _engineFailure, failure, null);   // libtorch's device thread (CUDA)
            return Enumerable.Repeat<Tensor>(null!, inputs).ToList();
        }
        finally
        {
            gradOutput.Dispose();
        }
    }

    /// <summary>
    /// <see cref="Run"/> for a function with several outputs: <paramref name="body"/> gets the saved tensors and the
    /// output gradients as they arrived (an invalid tensor for an output that got none, when the function turned
    /// materialisation off).
    /// </summary>
    public static List<Tensor> RunMany(string function, int inputs, torch.autograd.AutogradContext ctx, IReadOnlyList<Tensor> gradOutputs,
        Func<IReadOnlyList<Tensor>, IReadOnlyList<Tensor>, List<Tensor>> body)
    {
        Release();
        try
        {
            using var scope = torch.NewDisposeScope();
            return body(ctx.get_saved_variables(), gradOutputs);
        }
        catch (Exception e)
        {
            var failure = new UserError($"The backward of {function} failed: {e.Message}", e);
            if (_runsForwards) _threadFailure ??= failure;
            else Interlocked.CompareExchange(ref _engineFailure, failure, null);
            return Enumerable.Repeat<Tensor>(null!, inputs).ToList();
        }
        finally
        {
            foreach (var g in gradOutputs) if (g is not null && !g.IsInvalid) g.Dispose();
        }
    }

    /// <summary>Releases this thread's handles, then throws the first failure recorded since the last call, if any.</summary>
    public static void Complete()
    {
        Release();
        ThrowIfFailed();
    }

    /// <summary>Throws (once) a failure recorded by a managed backward.</summary>
    public static void ThrowIfFailed()
    {
        var failure = _threadFailure ?? Interlocked.Exchange(ref _engineFailure, null);
        _threadFailure = null;
        if (failure is not null) throw failure;
    }
}
