using System.CommandLine;
using Moe.Dsl;

namespace Moe.Runtime.Commands;

/// <summary>
/// Megatron's four activation-recompute flags, spelled as Megatron spells them, for the recipe overrides
/// (<see cref="RecipeOptions"/>) and <c>moe bench</c>: <c>--recompute-granularity none|selective|full</c>,
/// <c>--recompute-method uniform|block</c>, <c>--recompute-num-layers N</c>, <c>--recompute-modules core_attn moe …</c>.
/// The rule set (MOE0302–MOE0304) judges the combination.
/// </summary>
public sealed class RecomputeOptions
{
    private static readonly (string Name, RecomputeModules Module)[] ModuleNames =
        [("core_attn", RecomputeModules.CoreAttn), ("moe_act", RecomputeModules.MoeAct), ("layernorm", RecomputeModules.Layernorm), ("mlp", RecomputeModules.Mlp), ("moe", RecomputeModules.Moe)];

    public RecomputeOptions(Recompute defaults)
    {
        Granularity = new Option<string>("--recompute-granularity")
        {
            Description = "Activation recompute: none, selective (the --recompute-modules of every layer) or full (whole layers). Megatron: --recompute-granularity.",
            DefaultValueFactory = _ => Name(defaults.Granularity),
        };
        Granularity.AcceptOnlyFromAmong("none", "selective", "full");
        Method = new Option<string?>("--recompute-method")
        {
            Description = "Full recompute: uniform (chunks of --recompute-num-layers layers) or block (the first --recompute-num-layers layers). Megatron: --recompute-method.",
            DefaultValueFactory = _ => defaults.Method is RecomputeMethod m ? Name(m) : null,
        };
        Method.AcceptOnlyFromAmong("uniform", "block");
        NumLayers = new Option<int?>("--recompute-num-layers")
        {
            Description = "Full recompute: layers per chunk (uniform) or layers recomputed per stage (block). Megatron: --recompute-num-layers.",
            DefaultValueFactory = _ => defaults.NumLayers,
        };
        Modules = new Option<string[]>("--recompute-modules")
        {
            Description = "Selective recompute: any of core_attn, moe_act, moe (layernorm and mlp are refused, MOE0304). Default core_attn. Megatron: --recompute-modules.",
            DefaultValueFactory = _ => Names(defaults.Modules),
            AllowMultipleArgumentsPerToken = true,
        };
    }

    public Option<string> Granularity { get; }
    public Option<string?> Method { get; }
    public Option<int?> NumLayers { get; }
    public Option<string[]> Modules { get; }

    /// <summary>The four options, in help order.</summary>
    public IEnumerable<Option> All => [Granularity, Method, NumLayers, Modules];

    /// <summary>The settings the command line gives.</summary>
    public Recompute Parse(ParseResult parse) => new()
    {
        Granularity = parse.GetValue(Granularity) switch { "full" => RecomputeGranularity.Full, "selective" => RecomputeGranularity.Selective, _ => RecomputeGranularity.None },
        Method = parse.GetValue(Method) switch { "uniform" => RecomputeMethod.Uniform, "block" => RecomputeMethod.Block, _ => null },
        NumLayers = parse.GetValue(NumLayers),
        Modules = ParseModules(parse.GetValue(Modules) ?? []),
    };

    /// <summary>Megatron's module names (a list, or one comma-separated argument) as flags; an unknown name is a <see cref="UserError"/>.</summary>
    public static RecomputeModules ParseModules(IEnumerable<string> names)
    {
        var result = RecomputeModules.None;
        foreach (var name in names.SelectMany(n => n.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)))
        {
            var match = ModuleNames.FirstOrDefault(m => m.Name == name);
            if (match.Name is null)
                throw new UserError($"--recompute-modules {name}: not a module of Mixtral; valid: {string.Join(", ", ModuleNames.Select(m => m.Name))} " +
                    "(Megatron's mla_up_proj, shared_experts and the GatedDelta modules belong to other architectures).");
            result |= match.Module;
        }
        return result;
    }

    /// <summary>The setting as Megatron's flags would state it, e.g. "full uniform 1" or "selective core_attn,moe" or "none".</summary>
    public static string Describe(Recompute r) => r.Granularity switch
    {
        RecomputeGranularity.Full => $"full {(r.Method is RecomputeMethod m ? Name(m) : "?")} {r.NumLayers?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "?"}",
        RecomputeGranularity.Selective => "selective " + string.Join(",", Names(r.Modules)),
        _ => "none",
    };

    private static string Name(RecomputeGranularity g) => g switch { RecomputeGranularity.Full => "full", RecomputeGranularity.Selective => "selective", _ => "none" };

    private static string Name(RecomputeMethod m) => m == RecomputeMethod.Block ? "block" : "uniform";

    private static string[] Names(RecomputeModules modules) => ModuleNames.Where(m => (modules & m.Module) != 0).Select(m => m.Name).ToArray();
}
