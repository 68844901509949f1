using Moe.Dsl;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Moe.Runtime.MixtureOfExperts;

// Shapes: T tokens (B·S), H hidden, E experts, K top-k.

/// <summary>What one MoE layer did with a batch, for losses and metrics.</summary>
public sealed record MoeLayerOutput(Tensor HiddenTH, Routing Routing, Dispatch Dispatch)
{
    /// <summary>(token, expert) pairs routed to each expert, before capacity (int64 [E]).</summary>
    public Tensor RoutedPerExpert => Dispatch.RoutedPerExpertE;
}

/// <summary>
/// A sparse MoE block: router → dispatch (capacity, permutation) → grouped SwiGLU experts → weighted
/// combine. Megatron-Core's transformer/moe/moe_layer.py with transformers' Mixtral numerics by default.
/// </summary>
public sealed class MoeLayer : nn.Module
{
    private readonly Parameter gate;
    private readonly Experts experts;

    public MoeLayer(int numExperts, int hidden, int ffn, MoeOptions options, ScalarType dtype, Device device) : base("mlp")
    {
        Options = options;
        NumExperts = numExperts;
        gate = new Parameter(torch.empty(numExperts, hidden, dtype: dtype, device: device));
        experts = new Experts(numExperts, hidden, ffn, dtype, device);
        RegisterComponents();
    }

    public MoeOptions Options { get; set; }

    public int NumExperts { get; }

    /// <summary>Router weight [E, H] (hub: block_sparse_moe.gate.weight).</summary>
    public Parameter Gate => gate;

    public Experts ExpertWeights => experts;

    public MoeLayerOutput Forward(Tensor hiddenTH)
    {
        var routing = TopKRouter.Route(hiddenTH, gate, Options);
        var dispatch = LocalTokenDispatcher.Permute(hiddenTH, routing, NumExperts, Options);
        var outputsRH = experts.Forward(dispatch.RowsRH, dispatch.RowsPerExpertE);
        return new MoeLayerOutput(LocalTokenDispatcher.Unpermute(outputsRH, dispatch, hiddenTH.shape[0]), routing, dispatch);
    }
}
