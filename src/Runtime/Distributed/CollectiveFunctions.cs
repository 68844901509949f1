using Moe.Runtime.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.Distributed;

// Autograd-aware collectives (Megatron's tensor_parallel/mappings.py and moe/moe_utils.py): each forward is a
// collective and its backward the adjoint collective, so gradients flow across ranks exactly as the
// activations did. Rows are along dim 0; every tensor is made contiguous before it reaches the backend.

/// <summary>
/// All-to-all with uneven splits: forward sends <c>send[j]</c> rows to member j and receives <c>recv[j]</c> from it;
/// backward sends the gradient rows back (the same all-to-all with the splits swapped).
/// </summary>
public sealed class AllToAllFunction : torch.autograd.SingleTensorFunction<AllToAllFunction>
{
    public override string Name => nameof(AllToAllFunction);

    public static Tensor Apply(Tensor rows, Communicator group, long[] sendRows, long[] recvRows)
    {
        ManagedBackward.BeforeForward();
        return apply(rows, group, sendRows, recvRows);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (rows, group, send, recv) = ((Tensor)vars[0], (Communicator)vars[1], (long[])vars[2], (long[])vars[3]);
        ctx.save_data("group", group);
        ctx.save_data("send", send);
        ctx.save_data("recv", recv);
        return Exchange(rows, group, send, recv);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad) =>
        ManagedBackward.Run(Name, 4, ctx, grad, (_, g) =>
            [ManagedBackward.Keep(Exchange(g, (Communicator)ctx.get_data("group"), (long[])ctx.get_data("recv"), (long[])ctx.get_data("send"))), null!, null!, null!]);

    private static Tensor Exchange(Tensor rows, Communicator group, long[] send, long[] recv)
    {
        var input = rows.is_contiguous() ? rows : rows.contiguous();
        var shape = rows.shape.ToArray();
        shape[0] = recv.Sum();
        var output = torch.empty(shape, dtype: rows.dtype, device: rows.device);
        group.AllToAll(input, send, output, recv);
        return output;
    }
}

/// <summary>
/// Gathers every member's rows (member j has <c>rows[j]</c> of them) into one tensor in member order; backward
/// sums the gradient over the members and hands each its own rows (a reduce-scatter).
/// </summary>
public sealed class AllGatherRowsFunction : torch.autograd.SingleTensorFunction<AllGatherRowsFunction>
{
    public override string Name => nameof(AllGatherRowsFunction);

    public static Tensor Apply(Tensor rows, Communicator group, long[] rowsPerMember)
    {
        ManagedBackward.BeforeForward();
        return apply(rows, group, rowsPerMember);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (rows, group, sizes) = ((Tensor)vars[0], (Communicator)vars[1], (long[])vars[2]);
        ctx.save_data("group", group);
        ctx.save_data("sizes", sizes);
        return RowCollectives.AllGather(rows, group, sizes);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad) =>
        ManagedBackward.Run(Name, 3, ctx, grad, (_, g) =>
            [ManagedBackward.Keep(RowCollectives.ReduceScatter(g, (Communicator)ctx.get_data("group"), (long[])ctx.get_data("sizes"))), null!, null!]);
}

/// <summary>
/// Sums the members' tensors (each holding every member's rows, member j's block of <c>rows[j]</c>) and hands
/// each member its own block; backward gathers the gradient blocks back (an all-gather).
/// </summary>
public sealed class ReduceScatterRowsFunction : torch.autograd.SingleTensorFunction<ReduceScatterRowsFunction>
{
    public override string Name => nameof(ReduceScatterRowsFunction);

    public static Tensor Apply(Tensor rows, Communicator group, long[] rowsPerMember)
    {
        ManagedBackward.BeforeForward();
        return apply(rows, group, rowsPerMember);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var (rows, group, sizes) = ((Tensor)vars[0], (Communicator)vars[1], (long[])vars[2]);
        ctx.save_data("group", group);
        ctx.save_data("sizes", sizes);
        return RowCollectives.ReduceScatter(rows, group, sizes);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad) =>
        ManagedBackward.Run(Name, 3, ctx, grad, (_, g) =>
            [ManagedBackward.Keep(RowCollectives.AllGather(g, (Communicator)ctx.get_data("group"), (long[])ctx.get_data("sizes"))), null!, null!]);
}

/// <summary>
/// Identity forward, all-reduce (sum) of the gradient backward: Megatron's copy_to_tensor_model_parallel_region,
/// for an input every member of the group uses.
/// </summary>
public sealed class CopyToGroupFunction : torch.autograd.SingleTensorFunction<CopyToGroupFunction>
{
    public override string Name => nameof(CopyToGroupFunction);

    public static Tensor Apply(Tensor input, Communicator group)
    {
        if (group.Size == 1) return input;
        ManagedBackward.BeforeForward();
        return apply(input, group);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        ctx.save_data("group", vars[1]);
        return ((Tensor)vars[0]).alias();
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad) =>
        ManagedBackward.Run(Name, 2, ctx, grad, (_, g) =>
        {
            var sum = g.clone();
            ((Communicator)ctx.get_data("group")).AllReduce(sum);
            return [ManagedBackward.Keep(sum), null!];
        });
}

/// <summary>
/// All-reduce (sum) forward, identity backward: Megatron's reduce_from_tensor_model_parallel_region, for partial
/// results every member must add up.
/// </summary>
public sealed class ReduceFromGroupFunction : torch.autograd.SingleTensorFunction<ReduceFromGroupFunction>
{
    public override string Name => nameof(ReduceFromGroupFunction);

    public static Tensor Apply(Tensor input, Communicator group)
    {
        if (group.Size == 1) return input;
        ManagedBackward.BeforeForward();
        return apply(input, group);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var sum = ((Tensor)vars[0]).contiguous().clone();
        ((Communicator)vars[1]).AllReduce(sum);
        return sum;
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad) =>
        ManagedBackward.Run(Name, 2, ctx, grad, (_, g) => [ManagedBackward.Keep(g.clone()), null!]);
}

/// <summary>Row-wise collectives with uneven blocks, built on the backend's equal-block ones by padding each block to the largest.</summary>
public static class RowCollectives
{
    /// <summary>Member j contributes <paramref name="rows"/> (its <c>sizes[j]</c> rows); the result is every member's rows in member order.</summary>
    public static Tensor AllGather(Tensor rows, Communicator group, long[] sizes)
    {
        long max = sizes.Max();
        var tail = rows.shape.Skip(1).ToArray();
        using var scope = torch.NewDisposeScope();
        var padded = Pad(rows, max);
        var all = torch.empty([group.Size * max, .. tail], dtype: rows.dtype, device: rows.device);
        group.AllGather(padded, all);
        var pieces = sizes.Select((n, j) => all.narrow(0, j * max, n)).ToArray();
        return scope.MoveToOuter(torch.cat(pieces, 0));
    }

    /// <summary>Sums <paramref name="rows"/> (member j's block: <c>sizes[j]</c> rows, blocks in member order) over the group; returns this member's block.</summary>
    public static Tensor ReduceScatter(Tensor rows, Communicator group, long[] sizes)
    {
        long max = sizes.Max();
        var tail = rows.shape.Skip(1).ToArray();
        using var scope = torch.NewDisposeScope();
        long offset = 0;
        var blocks = new Tensor[group.Size];
        for (int j = 0; j < group.Size; j++)
        {
            blocks[j] = Pad(rows.narrow(0, offset, sizes[j]), max);
            offset += sizes[j];
        }
        var input = torch.cat(blocks, 0);
        var mine = torch.empty([max, .. tail], dtype: rows.dtype, device: rows.device);
        group.ReduceScatter(input, mine);
        return scope.MoveToOuter(mine.narrow(0, 0, sizes[group.Rank]).contiguous());
    }

    private static Tensor Pad(Tensor rows, long to)
    {
        var input = rows.is_contiguous() ? rows : rows.contiguous();
        if (rows.shape[0] == to) return input;
        var tail = rows.shape.Skip(1).ToArray();
        return torch.cat([input, torch.zeros([to - rows.shape[0], .. tail], dtype: rows.dtype, device: rows.device)], 0);
    }
}
