using Moe.Dsl;
using Moe.Dsl.Layout;
using Moe.Runtime.Distributed;
using Moe.Runtime.MixtureOfExperts;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.Modeling;

/// <summary>
/// How one rank's part of the model is cut from the single-device model: its experts (expert parallel, and the
/// FFN slice under expert tensor parallel) and the dispatcher that moves rows to them. The model code stays the
/// single-device code; the plan only decides the sizes of the parameters it builds and which dispatcher each MoE
/// layer gets. (torchtitan builds on the meta device and then shards; TorchSharp cannot materialise a meta
/// module, so the cut is applied as the parameters are created, which also never allocates the whole model.)
/// </summary>
/// <param name="Groups">This rank's process groups.</param>
/// <param name="Experts">This rank's experts and FFN slice.</param>
/// <param name="Dispatcher">All-to-all or all-gather (Megatron --moe-token-dispatcher-type).</param>
/// <param name="SequenceParallel">Sequence parallel over the tensor-parallel group (Megatron --sequence-parallel; <see cref="TensorParallel"/>).</param>
public sealed record ParallelPlan(ProcessGroups Groups, ExpertPlacement Experts, Dsl.TokenDispatcher Dispatcher, bool SequenceParallel = false)
{
    /// <summary>The plan of <paramref name="groups"/>' rank for a model of <paramref name="experts"/> experts.</summary>
    public static ParallelPlan For(ProcessGroups groups, int experts, Dsl.TokenDispatcher dispatcher, bool sequenceParallel = false)
    {
        var layout = groups.Layout;
        var mine = ExpertSplit.ExpertsOfRank(groups.Coordinates.Ep, experts, layout.Expert);
        return new ParallelPlan(groups, new ExpertPlacement(experts, mine.Start, mine.Count, groups.Coordinates.Etp, layout.ExpertTensor), dispatcher, sequenceParallel);
    }

    /// <summary>The dispatcher of one MoE layer.</summary>
    public IExpertDispatcher NewDispatcher()
    {
        if (Groups.Layout.Expert == 1 && Groups.Layout.ExpertTensor == 1) return new LocalExpertDispatcher(Experts.TotalExperts);
        return Dispatcher == Dsl.TokenDispatcher.AllGather
            ? new AllGatherExpertDispatcher(Experts, Groups.TpEp)
            : new AllToAllExpertDispatcher(Experts, Groups.Ep, Groups.Etp, Groups.TpEp);
    }
}

/// <summary>
/// Where a parameter's elements sit in the model's whole tensor: the local parameter, viewed as
/// <see cref="LocalShape"/>, is the block of the whole tensor (viewed as <see cref="GlobalShape"/>) that starts at
/// <see cref="Offsets"/>. A whole parameter has equal shapes and zero offsets. Experts' gate/up weights are
/// viewed as [E, 2, I, H] so that an FFN slice (rows of w1 and the same rows of w3) is one block.
/// </summary>
public sealed record TensorShard(long[] GlobalShape, long[] LocalShape, long[] Offsets)
{
    /// <summary>A parameter held whole.</summary>
    public static TensorShard Whole(long[] shape) => new(shape, shape, new long[shape.Length]);

    /// <summary>Whether this rank holds the whole tensor.</summary>
    public bool IsWhole => GlobalShape.SequenceEqual(LocalShape);

    /// <summary>This rank's block of <paramref name="global"/> (a tensor of <see cref="GlobalShape"/> elements, any shape).</summary>
    public Tensor Slice(Tensor global)
    {
        var t = global.view(GlobalShape);
        for (int d = 0; d < GlobalShape.Length; d++)
            if (LocalShape[d] != GlobalShape[d]) t = t.narrow(d, Offsets[d], LocalShape[d]);
        return t;
    }
}

/// <summary>
/// A run of a parameter's elements that is one block of its whole tensor (<see cref="ModelParameter.Pieces"/>), and the
/// tensor ranks that hold the same block.
/// </summary>
/// <param name="Start">First element in the local parameter, flattened.</param>
/// <param name="Length">Elements.</param>
/// <param name="Block">Its block of the whole tensor.</param>
/// <param name="Set">Which set of tensor ranks holds the block (replicated key-value heads: the group), 0 … TP/<paramref name="Replicas"/> − 1.</param>
/// <param name="Replica">This rank's index among the <paramref name="Replicas"/> ranks holding the block: the first counts it in the gradient norm and writes it in checkpoints.</param>
/// <param name="Replicas">Tensor ranks holding the same block (1: this rank alone).</param>
public sealed record ShardPiece(long Start, long Length, TensorShard Block, int Set = 0, int Replica = 0, int Replicas = 1)
{
    /// <summary>Whether other tensor ranks hold the same block: its gradient is summed over them.</summary>
    public bool IsShared => Replicas > 1;

    /// <summary>Whether another rank of the set counts and writes this block.</summary>
    public bool IsDuplicate => Replica > 0;
}

/// <summary>A parameter of this rank's model: its layout-independent name, and whether and how it is sharded.</summary>
/// <param name="Name">"model.layers.3.mlp.experts.gate_up" — the same on every rank and layout.</param>
/// <param name="Parameter">The local parameter.</param>
/// <param name="IsExpert">Expert weights: reduced over expert data parallel, not data parallel.</param>
/// <param name="Shard">Its place in the whole tensor (with <paramref name="Pieces"/>: the first piece's).</param>
/// <param name="Pieces">
/// Null when the parameter is one block of the whole tensor (<paramref name="Shard"/>). Otherwise the blocks its
/// flattened elements are made of, in order: under tensor parallel with replicated key-value heads (Megatron R017) a
/// rank's q/k/v weight is its query heads' rows followed by its group's key and value rows, which other ranks share.
/// </param>
public sealed record ModelParameter(string Name, Parameter Parameter, bool IsExpert, TensorShard Shard, IReadOnlyList<ShardPiece>? Pieces = null)
{
    /// <summary>The blocks of the parameter (one, <see cref="Shard"/>, unless it has <see cref="Pieces"/>).</summary>
    public IReadOnlyList<ShardPiece> Blocks => Pieces ?? [new ShardPiece(0, Parameter.NumberOfElements, Shard)];

    /// <summary>
    /// Where elements [<paramref name="start"/>, <paramref name="start"/> + <paramref name="length"/>) of the flattened
    /// parameter fall in its <see cref="Blocks"/>: each block they meet, its index, and [From, To) in the parameter's elements.
    /// </summary>
    public IEnumerable<(int Index, ShardPiece Piece, long From, long To)> BlocksWithin(long start, long length)
    {
        var blocks = Blocks;
        for (int i = 0; i < blocks.Count; i++)
        {
            var piece = blocks[i];
            long from = Math.Max(start, piece.Start), to = Math.Min(start + length, piece.Start + piece.Length);
            if (from < to) yield return (i, piece, from, to);
        }
    }

    /// <summary>This rank's elements of <paramref name="whole"/> (a tensor of the whole shape's elements) in the local parameter's shape.</summary>
    public Tensor Slice(Tensor whole) => Pieces is null
        ? Shard.Slice(whole).reshape(Parameter.shape)
        : torch.cat(Pieces.Select(p => p.Block.Slice(whole).flatten()).ToArray()).view(Parameter.shape);
}

/// <summary>
/// Seeded initialisation that gives every layout the same model: each parameter (and each expert of an expert
/// tensor) draws from its own generator, seeded from the run's seed and its name, so a rank can draw exactly its
/// own block whatever the others hold. transformers' scheme: normal(0, initializer_range) for matrices, ones for
/// norm weights.
/// </summary>
public static class ParameterInit
{
    /// <summary>Fills <paramref name="p"/> with its block of the whole tensor this seed gives.</summary>
    public static void Fill(ModelParameter p, long seed, double std)
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var param = p.Parameter;
        if (param.dim() == 1)
        {
            param.fill_(1.0);
            return;
        }
        var device = param.device;
        if (!p.IsExpert)
        {
            var whole = Normal(p.Shard.GlobalShape, Seed(seed, p.Name, -1), std, device);
            param.copy_(p.Slice(whole));
            return;
        }
        // Experts: one generator per global expert, so an expert-parallel rank draws only its own experts.
        long[] expertShape = p.Shard.GlobalShape[1..];
        var perExpert = new TensorShard(expertShape, p.Shard.LocalShape[1..], p.Shard.Offsets[1..]);
        var local = param.view(p.Shard.LocalShape);
        for (long e = 0; e < p.Shard.LocalShape[0]; e++)
        {
            long global = p.Shard.Offsets[0] + e;
            var whole = Normal(expertShape, Seed(seed, p.Name, global), std, device);
            local[e].copy_(perExpert.Slice(whole));
        }
    }

    /// <summary>
    /// normal(0, std) drawn on <paramref name="device"/>'s kind of generator: a CPU generator of its own on the CPU; on a
    /// GPU, CUDA's default generator seeded with <paramref name="seed"/> just before the draw (a CPU draw of 8x22B's experts
    /// took minutes, and TorchSharp's Generator is CPU-only). The two kinds give different numbers for one seed, so a
    /// model is the same across layouts of one device kind, not between a CPU and a GPU run. Nothing draws from CUDA's
    /// default generator after initialisation (no dropout, no router jitter), so reseeding it here changes nothing else.
    /// </summary>
    private static Tensor Normal(long[] shape, ulong seed, double std, Device device)
    {
        if (device.type != DeviceType.CUDA)
            return torch.randn(shape, dtype: ScalarType.Float32, generator: new torch.Generator(seed)).mul_(std);
        torch.cuda.manual_seed_all(unchecked((long)seed));
        return torch.randn(shape, dtype: ScalarType.Float32, device: device).mul_(std);
    }

    /// <summary>FNV-1a over "seed/name/index": a stable 64-bit seed per parameter and expert.</summary>
    public static ulong Seed(long seed, string name, long index)
    {
        ulong hash = 14695981039346656037UL;
        foreach (byte b in System.Text.Encoding.UTF8.GetBytes($"{seed}/{name}/{index}"))
        {
            hash ^= b;
            hash *= 1099511628211UL;
        }
        return hash;
    }
}
