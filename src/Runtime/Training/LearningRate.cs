using Moe.Dsl;

namespace Moe.Runtime.Training;

/// <summary>
/// Megatron's OptimizerParamScheduler for a step s = 1, 2, …: linear warm-up lr·s/W for s ≤ W, then
/// decay from lr to min_lr over the remaining steps — cosine: min + (lr − min)·½(1 + cos(π·r)),
/// linear: lr − (lr − min)·r, with r = (s − W)/(N − W); constant stays at lr.
/// </summary>
public static class LearningRate
{
    public static double At(int step, Dsl.Training t)
    {
        int warmup = t.WarmupSteps, total = t.Steps;
        if (warmup > 0 && step <= warmup) return t.LearningRate * step / warmup;
        if (t.Schedule == LrSchedule.Constant || total <= warmup) return t.LearningRate;
        double ratio = Math.Clamp((double)(step - warmup) / (total - warmup), 0, 1);
        double coefficient = t.Schedule == LrSchedule.Cosine ? 0.5 * (Math.Cos(Math.PI * ratio) + 1) : 1 - ratio;
        return t.MinLearningRate + coefficient * (t.LearningRate - t.MinLearningRate);
    }
}
