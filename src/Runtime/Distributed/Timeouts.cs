using System.Globalization;
using Moe.Dsl;

namespace Moe.Runtime.Distributed;

/// <summary>Deadlines of the distributed runtime.</summary>
public static class Timeouts
{
    /// <summary>The environment variable that overrides <see cref="Dsl.Training.DistributedTimeoutMinutes"/>, in seconds.</summary>
    public const string CollectiveVariable = "MOE_DISTRIBUTED_TIMEOUT_SECONDS";

    /// <summary>How long a collective may wait: <see cref="CollectiveVariable"/> if set, else the recipe's setting.</summary>
    public static TimeSpan Collective(RecipeSettings settings)
    {
        string? text = Environment.GetEnvironmentVariable(CollectiveVariable);
        if (string.IsNullOrWhiteSpace(text)) return TimeSpan.FromMinutes(settings.Training.DistributedTimeoutMinutes);
        if (!double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out double seconds) || !(seconds > 0) || double.IsInfinity(seconds))
            throw new UserError($"{CollectiveVariable}={text} is not a positive number of seconds; unset it to use Training.DistributedTimeoutMinutes ({settings.Training.DistributedTimeoutMinutes} min).");
        return TimeSpan.FromSeconds(seconds);
    }
}
