namespace Moe.Dsl.Layout;

/// <summary>
/// How Megatron-Core lays ranks out over the parallel axes; the first axis varies fastest.
/// Mirrors <c>initialize_model_parallel(order=...)</c>: <c>tp-cp-ep-dp-pp</c> by default,
/// <c>tp-cp-ep-pp-dp</c> with <c>--use-tp-pp-dp-mapping</c>.
/// </summary>
public enum RankOrder
{
    /// <summary><c>tp-cp-ep-dp-pp</c> (Megatron's default): pipeline stages are W/PP ranks apart.</summary>
    TpCpEpDpPp,

    /// <summary><c>tp-cp-ep-pp-dp</c> (<c>--use-tp-pp-dp-mapping</c>): data-parallel replicas are outermost.</summary>
    TpCpEpPpDp,
}
