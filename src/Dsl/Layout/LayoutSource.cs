using System;

namespace Moe.Dsl.Layout;

/// <summary>Where a run gets its rank layout: the recipe's generated wiring, or one computed at start-up.</summary>
public static class LayoutSource
{
    /// <summary>
    /// The layout a run with <paramref name="settings"/> uses: <paramref name="wiring"/> (the recipe's generated
    /// <c>Wiring.Layout</c>) when its topology — world, tp, pp, cp, ep, etp and order — is the settings' effective
    /// one (<see cref="RecipeSettings.Parallelism"/>, with <see cref="Parallelism.EffectiveExpertTensor"/>), else a
    /// <see cref="RankLayout"/> built from the settings: that is how command-line overrides get their layout.
    /// Validate the settings first; sizes that do not divide throw <see cref="ArgumentException"/>.
    /// </summary>
    public static IRankLayout For(RecipeSettings settings, IRankLayout? wiring)
    {
        if (settings is null) throw new ArgumentNullException(nameof(settings));
        var p = settings.Parallelism;
        if (wiring is not null && Describes(wiring, p)) return wiring;
        return new RankLayout(p.Gpus, p.Tensor, p.Pipeline, p.Context, p.Expert, p.EffectiveExpertTensor, p.Order);
    }

    /// <summary>Whether <paramref name="layout"/> has the topology of <paramref name="parallelism"/>: world, tp, pp, cp, ep, effective etp and order.</summary>
    public static bool Describes(IRankLayout layout, Parallelism parallelism)
    {
        if (layout is null) throw new ArgumentNullException(nameof(layout));
        if (parallelism is null) throw new ArgumentNullException(nameof(parallelism));
        return layout.World == parallelism.Gpus && layout.Tensor == parallelism.Tensor && layout.Pipeline == parallelism.Pipeline
            && layout.Context == parallelism.Context && layout.Expert == parallelism.Expert
            && layout.ExpertTensor == parallelism.EffectiveExpertTensor && layout.Order == parallelism.Order;
    }
}
