namespace Moe.Dsl;

/// <summary>How router logits become expert scores. Mirrors <c>--moe-router-score-function</c>.</summary>
public enum ScoreFunction
{
    /// <summary>Softmax over the experts (Mixtral's router).</summary>
    Softmax,

    /// <summary>Element-wise sigmoid; the top-k scores are renormalised when k &gt; 1.</summary>
    Sigmoid,
}

/// <summary>The router's load-balancing loss. Mirrors <c>--moe-router-load-balancing-type</c>.</summary>
public enum LoadBalancing
{
    /// <summary>Switch-style auxiliary loss per micro-batch (<c>aux_loss</c>).</summary>
    AuxLoss,

    /// <summary>Auxiliary loss computed per sequence, then averaged (<c>seq_aux_loss</c>).</summary>
    SeqAuxLoss,

    /// <summary>Auxiliary loss over the token counts of the whole global batch (<c>global_aux_loss</c>).</summary>
    GlobalAuxLoss,

    /// <summary>No load-balancing loss (<c>none</c>).</summary>
    None,
}

/// <summary>Which routed tokens an over-full expert keeps. Mirrors <c>--moe-token-drop-policy</c>.</summary>
public enum DropPolicy
{
    /// <summary>Keep the tokens with the highest routing probability (<c>probs</c>, Megatron's default).</summary>
    Probs,

    /// <summary>Keep tokens by position in the batch (<c>position</c>).</summary>
    Position,
}

/// <summary>How tokens reach the experts across expert-parallel ranks. Mirrors <c>--moe-token-dispatcher-type</c>.</summary>
public enum TokenDispatcher
{
    /// <summary>All-to-all over the expert-parallel group (<c>alltoall</c>); the usual choice when Expert &gt; 1.</summary>
    AllToAll,

    /// <summary>All-gather over the expert tensor × expert parallel group (<c>allgather</c>, Megatron's default).</summary>
    AllGather,
}

/// <summary>Data type of the router's gating matmul and probabilities. Mirrors <c>--moe-router-dtype</c>.</summary>
public enum RouterDtype
{
    /// <summary>Single precision (<c>fp32</c>).</summary>
    Fp32,

    /// <summary>Double precision (<c>fp64</c>).</summary>
    Fp64,
}

/// <summary>Training precision. Mirrors <c>--bf16</c> / <c>--fp16</c> (neither: fp32).</summary>
public enum Precision
{
    /// <summary>bfloat16 compute with fp32 master weights, gradients reduced in fp32 (<c>--bf16</c>).</summary>
    Bf16,

    /// <summary>Full fp32 training (no flag); what CPU runs use.</summary>
    Fp32,
}

/// <summary>Learning-rate decay after warm-up. Mirrors <c>--lr-decay-style</c>.</summary>
public enum LrSchedule
{
    /// <summary>Cosine decay from the peak to the minimum learning rate (<c>cosine</c>).</summary>
    Cosine,

    /// <summary>Linear decay from the peak to the minimum learning rate (<c>linear</c>).</summary>
    Linear,

    /// <summary>Constant after warm-up (<c>constant</c>).</summary>
    Constant,
}

/// <summary>What the data files hold. Moe's own setting (Megatron's SFT path uses its own dataset class).</summary>
public enum DataFormat
{
    /// <summary>Documents for next-token prediction on every token.</summary>
    Pretraining,

    /// <summary>Supervised fine-tuning records (<c>input</c>/<c>output</c>): prompt tokens are masked out of the loss.</summary>
    Sft,
}

/// <summary>NCCL's log level. Mirrors <c>NCCL_DEBUG</c>.</summary>
public enum NcclDebug
{
    /// <summary><c>WARN</c>: errors and warnings only (production).</summary>
    Warn,

    /// <summary><c>INFO</c>: topology and connection set-up (use while bringing a cluster up).</summary>
    Info,

    /// <summary><c>TRACE</c>: every call (debug builds of NCCL).</summary>
    Trace,

    /// <summary><c>VERSION</c>: the NCCL version only.</summary>
    Version,
}
