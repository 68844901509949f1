using Moe.Runtime.Distributed;
using TorchSharp;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shape legend
//   R  rows this rank sends: its kept (token, expert) pairs plus padding, sorted by global expert
//   Q  rows this rank's experts process, sorted by local expert
//   E  experts (global)   L  this rank's experts (E / EP)   H  hidden size
//   EP expert-parallel size   ETP expert tensor-parallel size

/// <summary>Which experts and which slice of each expert one rank holds (moe_layer.py: experts [r·E/EP, (r+1)·E/EP) of EP rank r).</summary>
/// <param name="TotalExperts">E.</param>
/// <param name="FirstExpert">The first global expert of this rank.</param>
/// <param name="LocalExperts">L = E / EP.</param>
/// <param name="TensorRank">This rank's index in its expert tensor-parallel group.</param>
/// <param name="TensorSize">ETP: each expert's FFN width is split into this many slices.</param>
public sealed record ExpertPlacement(int TotalExperts, int FirstExpert, int LocalExperts, int TensorRank = 0, int TensorSize = 1)
{
    /// <summary>All experts, whole: the one-device placement.</summary>
    public static ExpertPlacement All(int experts) => new(experts, 0, experts);
}

/// <summary>Where a layer's rows went, so their outputs can come back (opaque to the layer).</summary>
public abstract record DispatchContext;

/// <summary>
/// The communication phases of Megatron-Core's token dispatchers (transformer/moe/token_dispatcher.py), between
/// the local phases that <see cref="LocalTokenDispatcher"/> keeps (capacity, permutation by expert, and the
/// weighted un-permutation): <see cref="Dispatch"/> takes this rank's rows, sorted by global expert, to the ranks
/// that hold those experts and returns the rows this rank's experts must process, sorted by local expert;
/// <see cref="Combine"/> sends the experts' outputs back, so each rank gets its own rows in their original order.
/// </summary>
public interface IExpertDispatcher
{
    /// <summary>This rank's experts.</summary>
    ExpertPlacement Placement { get; }

    /// <param name="rowsRH">This rank's rows, sorted by global expert.</param>
    /// <param name="rowsPerExpertE">Rows per global expert (int64 [E]).</param>
    /// <returns>The rows for this rank's experts [Q, H], their count per local expert (int64 [L]), and the context for <see cref="Combine"/>.</returns>
    (Tensor RowsQH, Tensor RowsPerLocalExpertL, DispatchContext Context) Dispatch(Tensor rowsRH, Tensor rowsPerExpertE);

    /// <summary>The experts' outputs for the dispatched rows, returned to their ranks: [R, H] in this rank's row order.</summary>
    Tensor Combine(Tensor outputsQH, DispatchContext context);
}

/// <summary>All experts on this rank: nothing to communicate.</summary>
public sealed class LocalExpertDispatcher(int experts) : IExpertDispatcher
{
    private sealed record None : DispatchContext;

    public ExpertPlacement Placement { get; } = ExpertPlacement.All(experts);

    public (Tensor RowsQH, Tensor RowsPerLocalExpertL, DispatchContext Context) Dispatch(Tensor rowsRH, Tensor rowsPerExpertE) =>
        (rowsRH, rowsPerExpertE, new None());

    public Tensor Combine(Tensor outputsQH, DispatchContext context) => outputsQH;
}

/// <summary>
/// Megatron's all-to-all dispatcher (MoEAlltoAllTokenDispatcher), with expert tensor parallelism in its
/// "EP then ETP" order. Forward, per layer:
/// <list type="number">
/// <item>counts: every rank's rows per global expert, all-gathered over the tp_ep group (ETP varies fastest
/// inside it) and read to the host once — the one synchronisation, as in Megatron (the splits size the
/// collectives);</item>
/// <item>all-to-all over EP: to EP rank j go the rows of its experts (input_splits), from EP rank s come the rows
/// for this rank's experts (output_splits);</item>
/// <item>with ETP &gt; 1, an all-gather of those rows over the ETP group (each member computes a slice of every
/// expert's FFN for all of them);</item>
/// <item>sort_chunks_by_idxs: the received chunks, ordered (ETP member, source rank, local expert), are put in
/// (local expert, ETP member, source rank) order so each expert's rows are contiguous.</item>
/// </list>
/// Combine runs the inverse: unsort, reduce-scatter over ETP (summing the FFN slices' partial outputs), and the
/// all-to-all back with the splits swapped. Every step is differentiable (the collectives are autograd
/// functions whose backward is the adjoint collective; the sorts are index_selects).
/// </summary>
public sealed class AllToAllExpertDispatcher : IExpertDispatcher
{
    private readonly Communicator _ep, _etp, _tpEp;

    private sealed record Context(long[] InputSplits, long[] OutputSplits, long[] RowsPerEtpMember, Tensor Order, Tensor InverseOrder) : DispatchContext;

    public AllToAllExpertDispatcher(ExpertPlacement placement, Communicator ep, Communicator etp, Communicator tpEp)
    {
        if (tpEp.Size != ep.Size * etp.Size)
            throw new ArgumentException($"tp_ep ({tpEp.Size}) must hold EP ({ep.Size}) × ETP ({etp.Size}) ranks.");
        Placement = placement;
        _ep = ep;
        _etp = etp;
        _tpEp = tpEp;
    }

    public ExpertPlacement Placement { get; }

    public (Tensor RowsQH, Tensor RowsPerLocalExpertL, DispatchContext Context) Dispatch(Tensor rowsRH, Tensor rowsPerExpertE)
    {
        int experts = Placement.TotalExperts, local = Placement.LocalExperts, ep = _ep.Size, etp = _etp.Size;
        // counts[m, e]: rows member m of tp_ep sends to global expert e (member m = ep rank · ETP + etp rank).
        var all = torch.empty(_tpEp.Size * experts, dtype: ScalarType.Int64, device: rowsPerExpertE.device);
        _tpEp.AllGather(rowsPerExpertE.contiguous(), all);
        long[] counts = all.cpu().data<long>().ToArray();
        all.Dispose();
        long Count(int epRank, int etpRank, int expert) => counts[(epRank * etp + etpRank) * experts + expert];
        int me = _ep.Rank, myEtp = _etp.Rank, first = Placement.FirstExpert;

        var inputSplits = new long[ep];
        for (int j = 0; j < ep; j++)
            for (int e = j * local; e < (j + 1) * local; e++) inputSplits[j] += Count(me, myEtp, e);
        var outputSplits = new long[ep];
        for (int s = 0; s < ep; s++)
            for (int e = first; e < first + local; e++) outputSplits[s] += Count(s, myEtp, e);

        var received = AllToAllFunction.Apply(rowsRH, _ep, inputSplits, outputSplits);
        var rowsPerEtpMember = new long[etp];
        for (int t = 0; t < etp; t++)
            for (int s = 0; s < ep; s++)
                for (int e = first; e < first + local; e++) rowsPerEtpMember[t] += Count(s, t, e);
        var gathered = etp > 1 ? AllGatherRowsFunction.Apply(received, _etp, rowsPerEtpMember) : received;

        // Chunk (t, s, e) starts where the rows of ETP member t, source s and local expert e begin in the gathered
        // tensor; the order visits the chunks by local expert first.
        var chunkStart = new long[etp, ep, local];
        long offset = 0;
        for (int t = 0; t < etp; t++)
            for (int s = 0; s < ep; s++)
                for (int e = 0; e < local; e++)
                {
                    chunkStart[t, s, e] = offset;
                    offset += Count(s, t, first + e);
                }
        var order = new long[offset];
        var rowsPerLocalExpert = new long[local];
        long at = 0;
        for (int e = 0; e < local; e++)
            for (int t = 0; t < etp; t++)
                for (int s = 0; s < ep; s++)
                {
                    long n = Count(s, t, first + e);
                    for (long i = 0; i < n; i++) order[at++] = chunkStart[t, s, e] + i;
                    rowsPerLocalExpert[e] += n;
                }
        var inverse = new long[order.Length];
        for (long i = 0; i < order.Length; i++) inverse[order[i]] = i;
        var device = rowsRH.device;
        var orderQ = torch.tensor(order, device: device);
        var inverseQ = torch.tensor(inverse, device: device);
        var sorted = gathered.index_select(0, orderQ);
        return (sorted, torch.tensor(rowsPerLocalExpert, device: device), new Context(inputSplits, outputSplits, rowsPerEtpMember, orderQ, inverseQ));
    }

    public Tensor Combine(Tensor outputsQH, DispatchContext context)
    {
        var c = (Context)context;
        var unsorted = outputsQH.index_select(0, c.InverseOrder);
        var mine = _etp.Size > 1 ? ReduceScatterRowsFunction.Apply(unsorted, _etp, c.RowsPerEtpMember) : unsorted;
        return AllToAllFunction.Apply(mine, _ep, c.OutputSplits, c.InputSplits);
    }
}

/// <summary>
/// Megatron's all-gather dispatcher (MoEAllGatherTokenDispatcher): every rank of the tp_ep group gets all of the
/// group's rows (an all-gather), its experts process those routed to them, and the outputs are summed back to
/// the rows' own ranks (a reduce-scatter). Simpler than all-to-all, more traffic; with ETP each member computes a
/// slice of the FFN and the reduce-scatter also sums the slices.
/// </summary>
public sealed class AllGatherExpertDispatcher : IExpertDispatcher
{
    private readonly Communicator _tpEp;

    private sealed record Context(long[] RowsPerMember, Tensor Selected, long TotalRows) : DispatchContext;

    public AllGatherExpertDispatcher(ExpertPlacement placement, Communicator tpEp)
    {
        Placement = placement;
        _tpEp = tpEp;
    }

    public ExpertPlacement Placement { get; }

    public (Tensor RowsQH, Tensor RowsPerLocalExpertL, DispatchContext Context) Dispatch(Tensor rowsRH, Tensor rowsPerExpertE)
    {
        int experts = Placement.TotalExperts, members = _tpEp.Size;
        var all = torch.empty(members * experts, dtype: ScalarType.Int64, device: rowsPerExpertE.device);
        _tpEp.AllGather(rowsPerExpertE.contiguous(), all);
        long[] counts = all.cpu().data<long>().ToArray();
        all.Dispose();
        var rowsPerMember = Enumerable.Range(0, members).Select(m => counts.Skip(m * experts).Take(experts).Sum()).ToArray();
        var gathered = AllGatherRowsFunction.Apply(rowsRH, _tpEp, rowsPerMember);
        // Every member's rows are sorted by global expert; take, expert by expert, the rows of this rank's experts.
        var selected = new List<long>();
        var rowsPerLocalExpert = new long[Placement.LocalExperts];
        var memberStart = new long[members];
        for (int m = 1; m < members; m++) memberStart[m] = memberStart[m - 1] + rowsPerMember[m - 1];
        for (int e = 0; e < Placement.LocalExperts; e++)
        {
            int global = Placement.FirstExpert + e;
            for (int m = 0; m < members; m++)
            {
                long start = memberStart[m] + counts.Skip(m * experts).Take(global).Sum();
                long n = counts[m * experts + global];
                for (long i = 0; i < n; i++) selected.Add(start + i);
                rowsPerLocalExpert[e] += n;
            }
        }
        var device = rowsRH.device;
        var selectedQ = torch.tensor(selected.ToArray(), device: device);
        return (gathered.index_select(0, selectedQ), torch.tensor(rowsPerLocalExpert, device: device), new Context(rowsPerMember, selectedQ, rowsPerMember.Sum()));
    }

    public Tensor Combine(Tensor outputsQH, DispatchContext context)
    {
        var c = (Context)context;
        var full = torch.zeros([c.TotalRows, outputsQH.shape[1]], dtype: outputsQH.dtype, device: outputsQH.device).index_add(0, c.Selected, outputsQH, 1);
        return ReduceScatterRowsFunction.Apply(full, _tpEp, c.RowsPerMember);
    }
}
