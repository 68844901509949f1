namespace Moe.Dsl;

/// <summary>
/// A fine-tuning recipe. Derive a <c>sealed partial</c> class, mark it <see cref="RecipeAttribute"/>,
/// and override the settings that differ from the defaults. Recipes may inherit from other recipes.
/// </summary>
public abstract class Recipe
{
    /// <summary>The model architecture (a preset such as <see cref="Model.Mixtral8x7B"/>, or a variant of one).</summary>
    public abstract Model Model { get; }

    /// <summary>GPU layout. Default: one GPU.</summary>
    public virtual Parallelism Parallelism => new();

    /// <summary>Router settings. Default: the model's top-k, softmax, aux loss with the model's coefficient.</summary>
    public virtual Router Router => new();

    /// <summary>Expert capacity. Default: dropless.</summary>
    public virtual Capacity Capacity => Capacity.Dropless;

    /// <summary>Token dispatcher. Megatron: <c>--moe-token-dispatcher-type</c>.</summary>
    public virtual TokenDispatcher Dispatcher => TokenDispatcher.AllToAll;

    /// <summary>Training data.</summary>
    public virtual Data Data => new();

    /// <summary>Optimisation settings.</summary>
    public virtual Training Training => new();

    /// <summary>Checkpoint load/save.</summary>
    public virtual Checkpoint Checkpoint => new();

    /// <summary>NCCL environment.</summary>
    public virtual Nccl Nccl => new();

    /// <summary>Training-health checks and TensorBoard. Default: the tutorial's bounds, warnings only.</summary>
    public virtual Health Health => new();

    /// <summary>Activation recompute. Default: none. Megatron: <c>--recompute-granularity</c> and its companions.</summary>
    public virtual Recompute Recompute => Recompute.Off;

    /// <summary>All settings as one value, for validation and planning.</summary>
    public RecipeSettings ToSettings() => new()
    {
        Name = GetType().Name,
        Model = Model,
        Parallelism = Parallelism,
        Router = Router,
        Capacity = Capacity,
        Dispatcher = Dispatcher,
        Data = Data,
        Training = Training,
        Checkpoint = Checkpoint,
        Nccl = Nccl,
        Health = Health,
        Recompute = Recompute,
    };
}
