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
            ReleaseSaved(ctx);
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
            ReleaseSaved(ctx);
        }
    }

    private static readonly System.Reflection.FieldInfo SavedVariablesField =
        typeof(torch.autograd.AutogradContext).GetField("_savedVariables", System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Instance)
        ?? throw new InvalidOperationException("TorchSharp's AutogradContext has no _savedVariables field (it had in 0.107): ManagedBackward.ReleaseSaved needs updating for this TorchSharp.");

    /// <summary>
    /// Frees what the forward saved for the backward, once the backward has run: PyTorch's engine does this for its own
    /// nodes (release_variables, unless the graph is retained), but TorchSharp's managed nodes keep their saved variables
    /// until the whole graph goes, after the last backward. For the grouped experts that is the rows and the gate/up
    /// projections, 1 GiB per layer of 8x7B at 8192 tokens, held by every layer until the step's backward returned
    /// (the H200 trace, docs/performance.md). Nothing here runs a backward twice (no retain_graph). A body may call it
    /// itself once it holds handles to what it needs (from <c>get_saved_variables</c>), to free each piece earlier; the
    /// call after the body then finds nothing left to drop.
    /// </summary>
    public static void ReleaseSaved(torch.autograd.AutogradContext ctx)
    {
        if (SavedVariablesField.GetValue(ctx) is not System.Collections.IEnumerable saved) return;
        foreach (var v in saved) ResetData.Invoke(v, null);
    }

    /// <summary>TorchSharp's internal SavedVariable.reset_data (libtorch's SavedVariable::reset_data: drops the tensor).</summary>
    private static readonly System.Reflection.MethodInfo ResetData =
        SavedVariablesField.FieldType.GetGenericArguments().SingleOrDefault()?.GetMethod("reset_data", System.Reflection.BindingFlags.Public | System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Instance, Type.EmptyTypes)
        ?? throw new InvalidOperationException("TorchSharp's SavedVariable has no reset_data() (it had in 0.107): ManagedBackward.ReleaseSaved needs updating for this TorchSharp.");

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
