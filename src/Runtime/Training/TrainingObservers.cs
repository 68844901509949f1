namespace Moe.Runtime.Training;

/// <summary>
/// What the trainer tells the world, and the only way it does (issue 15): the run starts, each optimizer step
/// ends with its <see cref="StepMetrics"/>, the run ends. An observer may return the step's metrics enriched
/// (<c>m with { … }</c>: device memory, validation loss, warnings, a stop reason); observers run in order, so
/// the writers that come last record what the checks before them added. The trainer adds the returned metrics
/// to its history and stops after a step whose <see cref="StepMetrics.StopReason"/> is set.
/// </summary>
public interface ITrainingObserver
{
    /// <summary>Before the first step.</summary>
    void RunStarted() { }

    /// <summary>After each optimizer step; returns the metrics to pass on (the same ones, or enriched).</summary>
    StepMetrics StepEnded(StepMetrics step) => step;

    /// <summary>After the last step, or after the step that asked to stop (not after an exception).</summary>
    void RunEnded(TrainResult result) { }
}

/// <summary>Observers in order: each step's metrics pass through every one, each seeing what the ones before added.</summary>
public sealed class TrainingObservers(params IEnumerable<ITrainingObserver> observers) : ITrainingObserver
{
    private readonly ITrainingObserver[] _observers = observers.ToArray();

    /// <summary>No observer: the trainer only returns its history.</summary>
    public static TrainingObservers None { get; } = new();

    public void RunStarted()
    {
        foreach (var o in _observers) o.RunStarted();
    }

    public StepMetrics StepEnded(StepMetrics step)
    {
        foreach (var o in _observers) step = o.StepEnded(step);
        return step;
    }

    public void RunEnded(TrainResult result)
    {
        foreach (var o in _observers) o.RunEnded(result);
    }
}
