using Moe.Runtime.Distributed;

namespace Moe.Runtime.Training;

/// <summary>
/// Whether this rank's gradient buffers may overlap their reduction with the backward (Training.OverlapGradReduce,
/// Megatron's --overlap-grad-reduce), and why not when they may not. The answer depends on the layout alone, so every
/// rank of a group decides alike.
/// </summary>
/// <remarks>
/// One case is refused, said at start-up rather than run differently in silence: the expert data-parallel communicator is
/// the very communicator of a group the backward uses (the groups of equal ranks share one: <see cref="ProcessGroups"/>).
/// A reduction started inside the backward would share its communicator with the backward's tensor-, context-, expert-
/// or pipeline-parallel collectives on another stream, which NCCL does not order. Megatron never meets this, since
/// every family there is its own process group.
/// </remarks>
public static class GradientOverlap
{
    /// <summary>Why overlap cannot run on this rank's layout, or null when it can.</summary>
    public static string? Refusal(ProcessGroups groups)
    {
        var edp = groups.Edp;
        if (edp.Size == 1) return null;
        foreach (var family in new[] { "tp", "cp", "tp_cp", "ep", "expert_tp", "tp_ep", "pp" })
        {
            var used = groups[family];
            if (used.Size > 1 && ReferenceEquals(used, edp))
                return $"the expert data-parallel group {edp.Describe()} shares its communicator with the {family} group, whose collectives run inside the backward; " +
                    "every bucket is reduced after the backward";
        }
        return null;
    }
}
