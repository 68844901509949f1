namespace Moe.Dsl.Validation;

/// <summary>The stable ID of every Moe rule. Ranges per category: DiagnosticCategoryAndIdRanges.txt.</summary>
public static class DiagnosticIds
{
    // Topology: MOE0001-MOE0099
    /// <summary>A parallel size is zero or negative.</summary>
    public const string SizeNotPositive = "MOE0001";
    /// <summary>Gpus is not a multiple of Tensor × Pipeline × Context (Megatron R001).</summary>
    public const string GpusNotDivisibleByModelParallel = "MOE0002";
    /// <summary>Expert does not divide the model's experts (R055).</summary>
    public const string ExpertNotDividingExperts = "MOE0003";
    /// <summary>Gpus is not a multiple of ExpertTensor × Expert × Pipeline (R003).</summary>
    public const string GpusNotDivisibleByExpertParallel = "MOE0004";
    /// <summary>Order tp-cp-ep-pp-dp with Pipeline &gt; 1 needs expert DP equal to dense DP (R005).</summary>
    public const string ExpertDataParallelMismatch = "MOE0005";
    /// <summary>Tensor does not divide the attention heads (R014).</summary>
    public const string TensorNotDividingHeads = "MOE0006";
    /// <summary>Tensor and the key-value heads are neither multiple nor divisor of each other (R016, R017).</summary>
    public const string TensorIncompatibleWithKeyValueHeads = "MOE0007";
    /// <summary>ExpertTensor does not divide the expert FFN size (R020).</summary>
    public const string ExpertTensorNotDividingFfn = "MOE0008";
    /// <summary>Sequence parallel without tensor parallel (R025).</summary>
    public const string SequenceParallelWithoutTensor = "MOE0009";
    /// <summary>MoE training with Tensor &gt; 1 requires sequence parallel (R026).</summary>
    public const string TensorParallelMoeNeedsSequenceParallel = "MOE0010";
    /// <summary>Pipeline does not divide the layers (R036).</summary>
    public const string PipelineNotDividingLayers = "MOE0011";
    /// <summary>A virtual pipeline needs Pipeline &gt; 1 (R039).</summary>
    public const string VirtualPipelineWithoutPipeline = "MOE0012";
    /// <summary>VirtualPipeline does not divide the layers of a stage (R038, R040).</summary>
    public const string VirtualPipelineNotDividingStage = "MOE0013";
    /// <summary>Uneven first/last pipeline stages do not add up (R041).</summary>
    public const string UnevenPipelineInvalid = "MOE0014";
    /// <summary>The model's dimensions are inconsistent (R018, R023, R057).</summary>
    public const string ModelDimensionsInvalid = "MOE0015";

    // Router and capacity: MOE0100-MOE0199
    /// <summary>TopK is outside 1..experts (R061; Megatron does not check).</summary>
    public const string TopKOutOfRange = "MOE0101";
    /// <summary>TopK = 1 with post-top-k softmax has zero router gradient (R062).</summary>
    public const string TopKOneNeedsPreSoftmax = "MOE0102";
    /// <summary>PreSoftmax has no effect with the sigmoid score function.</summary>
    public const string PreSoftmaxIgnoredWithSigmoid = "MOE0103";
    /// <summary>Group-limited routing is incomplete or does not divide (R067).</summary>
    public const string GroupLimitedRoutingIncomplete = "MOE0104";
    /// <summary>Group-limited routing arithmetic selects masked experts (R070; Megatron does not check).</summary>
    public const string GroupLimitedRoutingArithmetic = "MOE0105";
    /// <summary>NumGroups without GroupTopK is ignored (R071).</summary>
    public const string NumGroupsWithoutGroupTopK = "MOE0106";
    /// <summary>An aux-loss coefficient with LoadBalancing = None is never used (R074).</summary>
    public const string AuxLossCoeffUnused = "MOE0107";
    /// <summary>A loss coefficient is negative.</summary>
    public const string NegativeLossCoefficient = "MOE0108";
    /// <summary>The capacity factor is zero or negative (Megatron silently turns a negative one into dropless).</summary>
    public const string CapacityFactorNotPositive = "MOE0109";
    /// <summary>PadToCapacity needs a capacity factor (R083).</summary>
    public const string PadToCapacityWithoutFactor = "MOE0110";
    /// <summary>The expert bias (aux-loss-free balancing) needs sigmoid scores (R079).</summary>
    public const string ExpertBiasNeedsSigmoid = "MOE0111";
    /// <summary>The expert-bias update rate is zero, negative or not finite (Megatron does not check).</summary>
    public const string BiasUpdateRateNotPositive = "MOE0112";
    /// <summary>A BiasUpdateRate without EnableExpertBias is never used.</summary>
    public const string BiasUpdateRateUnused = "MOE0113";

    // Data and training: MOE0200-MOE0299
    /// <summary>A batch size is zero or negative (R047, R048).</summary>
    public const string BatchSizeNotPositive = "MOE0201";
    /// <summary>GlobalBatchSize is not a multiple of MicroBatchSize × data parallel (R049).</summary>
    public const string GlobalBatchNotDivisible = "MOE0202";
    /// <summary>The interleaved schedule needs micro-batches ≥ Pipeline and a multiple of it (R051).</summary>
    public const string InterleavedMicrobatches = "MOE0203";
    /// <summary>SequenceLength exceeds the model's max_position_embeddings (R053).</summary>
    public const string SequenceLongerThanPositions = "MOE0204";
    /// <summary>The data split string is malformed (R127).</summary>
    public const string InvalidSplit = "MOE0205";
    /// <summary>With Context &gt; 1 the sequence length must be a multiple of 2 × Context (R030).</summary>
    public const string SequenceNotDivisibleForContext = "MOE0206";
    /// <summary>With sequence parallel the per-context-rank sequence must be a multiple of Tensor (R029).</summary>
    public const string SequenceNotDivisibleForSequenceParallel = "MOE0207";
    /// <summary>An optimizer or schedule setting is out of range.</summary>
    public const string OptimizerSettingInvalid = "MOE0208";
    /// <summary>The sequence length is zero or negative.</summary>
    public const string SequenceLengthNotPositive = "MOE0209";
    /// <summary>A checkpoint interval is not positive, or is given without a save directory.</summary>
    public const string CheckpointIntervalInvalid = "MOE0210";
    /// <summary>A training-health bound is out of range, cannot fire, or can never be exceeded.</summary>
    public const string HealthSettingInvalid = "MOE0211";
    /// <summary>The evaluation settings are out of range, or evaluate a validation split of weight zero.</summary>
    public const string EvaluationSettingInvalid = "MOE0212";
    /// <summary>WarmupSteps exceeds Steps: the warm-up is capped at the run's length.</summary>
    public const string WarmupLongerThanRun = "MOE0213";

    // Memory: MOE0300-MOE0399
    /// <summary>The per-GPU memory estimate exceeds the recipe's GPU (Moe's own; Megatron runs out of memory instead).</summary>
    public const string PlanDoesNotFitGpu = "MOE0301";
    /// <summary>Full recompute needs a method and a number of layers within a stage (R122).</summary>
    public const string RecomputeFullIncomplete = "MOE0302";
    /// <summary>A recompute method or number of layers without full recompute (R122).</summary>
    public const string RecomputeMethodWithoutFull = "MOE0303";
    /// <summary>A selective recompute module that Mixtral lacks or Moe does not implement (R123).</summary>
    public const string RecomputeModuleUnsupported = "MOE0304";
    /// <summary>Capacity.RoutingSkew is below 1 or above Experts / TopK (Moe's own).</summary>
    public const string RoutingSkewOutOfRange = "MOE0305";

    // Start-up: MOE0900-MOE0999
    /// <summary>The recipe's Gpus differs from the launcher's world size.</summary>
    public const string WorldSizeMismatch = "MOE0901";
    /// <summary>A setting is not a compile-time constant and is checked at start-up (analyzer only).</summary>
    public const string CheckedAtStartUp = "MOE0902";
    /// <summary>A data or checkpoint file the recipe names does not exist.</summary>
    public const string InputFileMissing = "MOE0903";
    /// <summary>Tensor or context parallel on pre-Blackwell GPUs wants CUDA_DEVICE_MAX_CONNECTIONS=1 (R035).</summary>
    public const string CudaDeviceMaxConnections = "MOE0904";
}
