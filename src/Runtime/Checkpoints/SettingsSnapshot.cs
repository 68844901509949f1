using System.Globalization;
using System.Reflection;
using System.Text.Json.Nodes;
using Moe.Dsl;

namespace Moe.Runtime.Checkpoints;

/// <summary>
/// A recipe's settings as a flat map of setting paths to JSON values ("Training.Seed": 1234, "Capacity.Factor": null),
/// saved in a checkpoint and compared with the resuming recipe. Three kinds of setting:
/// <list type="bullet">
/// <item>free — the layout (Parallelism.*, the dispatcher, the distributed optimizer, gradient-reduction overlap, the micro-batch size), where
/// checkpoints go (Checkpoint.*), the precision, NCCL and names, and the data and tokenizer paths (a moved dataset is
/// noted, not refused): a checkpoint is resharded to any of them;</item>
/// <item>shape — the model's architecture (hidden, FFN, layers, heads, KV heads, head dim, experts, vocabulary, tied
/// embeddings): the tensors cannot fit another one, so a difference is always an error;</item>
/// <item>dynamics — everything else (top-k, capacity factor, drop policy, router and loss settings, seed, steps,
/// schedule, AdamW, batch size, sequence length, data options, the model's non-shape fields): a difference is an
/// error naming each field unless <c>--allow-changed</c> lists it.</item>
/// </list>
/// </summary>
public static class SettingsSnapshot
{
    private static readonly string[] Free =
    [
        "Name", "Unknown", "Parallelism", "Dispatcher", "Checkpoint", "Nccl", "Training.DistributedOptimizer", "Training.DistributedTimeoutMinutes", "Training.OverlapGradReduce",
        "Training.MicroBatchSize", "Training.Precision", "Model.Name", "Model.HubId", "Data.Prefix", "Data.Tokenizer",
    ];

    private static readonly string[] Shape =
    [
        "Model.HiddenSize", "Model.IntermediateSize", "Model.Layers", "Model.AttentionHeads", "Model.KeyValueHeads", "Model.HeadDim",
        "Model.Experts", "Model.VocabSize", "Model.TieWordEmbeddings",
    ];

    /// <summary>Every init-settable setting of <paramref name="s"/> by path, in ordinal order; enums as their names.</summary>
    public static Dictionary<string, JsonNode?> Flatten(RecipeSettings s)
    {
        var flat = new SortedDictionary<string, JsonNode?>(StringComparer.Ordinal);
        Walk(s, "", flat);
        return new Dictionary<string, JsonNode?>(flat, StringComparer.Ordinal);
    }

    private static void Walk(object value, string prefix, SortedDictionary<string, JsonNode?> flat)
    {
        foreach (var p in value.GetType().GetProperties(BindingFlags.Public | BindingFlags.Instance).Where(p => p.SetMethod is not null && p.GetIndexParameters().Length == 0))
        {
            string path = prefix + p.Name;
            var type = Nullable.GetUnderlyingType(p.PropertyType) ?? p.PropertyType;
            object? v = p.GetValue(value);
            if (type.IsClass && type != typeof(string) && type.Namespace == typeof(RecipeSettings).Namespace)
            {
                if (v is not null) Walk(v, path + ".", flat);
            }
            else if (type == typeof(string) || type.IsPrimitive || type.IsEnum || type == typeof(double))
            {
                flat[path] = v switch
                {
                    null => null,
                    Enum e => JsonValue.Create(e.ToString()),
                    string t => JsonValue.Create(t),
                    bool b => JsonValue.Create(b),
                    int i => JsonValue.Create(i),
                    long l => JsonValue.Create(l),
                    double d => JsonValue.Create(d),
                    _ => JsonValue.Create(Convert.ToString(v, CultureInfo.InvariantCulture)),
                };
            }
            // Collections (Unknown) are not settings.
        }
    }

    /// <summary>Whether <paramref name="path"/> (or a setting it belongs to) may change freely.</summary>
    public static bool IsFree(string path) => Free.Any(f => path == f || path.StartsWith(f + ".", StringComparison.Ordinal));

    /// <summary>Whether <paramref name="path"/> fixes a tensor's shape.</summary>
    public static bool IsShape(string path) => Shape.Contains(path, StringComparer.Ordinal);

    /// <summary>
    /// Whether one of <paramref name="allowed"/> names <paramref name="path"/>: the path itself ("Training.Seed"), its last
    /// part ("seed") or its group ("capacity" for every Capacity.* setting), case-insensitive, '-' and '_' ignored.
    /// </summary>
    public static bool Allows(IEnumerable<string> allowed, string path)
    {
        string full = Normal(path), last = Normal(path[(path.LastIndexOf('.') + 1)..]), group = Normal(path.Split('.')[0]);
        return allowed.Select(Normal).Any(a => a == full || a == last || a == group);
    }

    /// <summary>
    /// Refuses names in <paramref name="allowed"/> that name no setting that may be allowed to change (a typo must not
    /// silently allow nothing), and names that only name shape settings.
    /// </summary>
    public static void CheckAllowed(IReadOnlyCollection<string> allowed, RecipeSettings now)
    {
        var dynamics = Flatten(now).Keys.Where(p => !IsFree(p)).ToList();
        foreach (var name in allowed)
        {
            var named = dynamics.Where(p => Allows([name], p)).ToList();
            if (named.Count == 0)
                throw new UserError($"--allow-changed {name}: no setting of that name changes the training dynamics; use a setting path or its last part, " +
                    $"e.g. seed, Capacity.Factor, TopK, Steps, LearningRate (the dynamics settings: {string.Join(", ", dynamics.Where(p => !IsShape(p)))}).");
            if (named.All(IsShape))
                throw new UserError($"--allow-changed {name}: {string.Join(", ", named)} fixes the shapes of the model's tensors, so a checkpoint cannot load into another value.");
        }
    }

    /// <summary>
    /// Compares a checkpoint's settings with the recipe's. A different shape setting, or a dynamics setting that
    /// <paramref name="allowed"/> does not name, is a <see cref="UserError"/> naming every such field with both values;
    /// allowed and free differences worth knowing are written to <paramref name="log"/>.
    /// </summary>
    public static void Check(IReadOnlyDictionary<string, JsonNode?> saved, RecipeSettings now, IReadOnlyCollection<string> allowed, string where, TextWriter log)
    {
        CheckAllowed(allowed, now);
        var current = Flatten(now);
        var changes = saved.Keys.Union(current.Keys).Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal)
            .Select(p => (Path: p, Saved: Text(saved.GetValueOrDefault(p), saved.ContainsKey(p)), Now: Text(current.GetValueOrDefault(p), current.ContainsKey(p))))
            .Where(c => c.Saved != c.Now)
            .ToList();
        string List(IEnumerable<(string Path, string Saved, string Now)> cs) => string.Join(", ", cs.Select(c => $"{c.Path} ({c.Saved} → {c.Now})"));
        var shape = changes.Where(c => IsShape(c.Path)).ToList();
        if (shape.Count > 0)
            throw new UserError($"{where}: the checkpoint holds another model: {List(shape)}; its tensors do not fit the recipe's model ({now.Model.Name}). " +
                "Choose the checkpoint's model (the Model preset it was trained with) or another checkpoint.");
        var refused = changes.Where(c => !IsFree(c.Path) && !Allows(allowed, c.Path)).ToList();
        if (refused.Count > 0)
            throw new UserError($"{where}: the checkpoint was trained with other settings: {List(refused)}. Resuming with these changes the training dynamics; " +
                $"pass --allow-changed {string.Join(",", refused.Select(c => c.Path))} if the change is intended, or run with the checkpoint's values.");
        foreach (var c in changes.Where(c => !IsFree(c.Path)))
            log.WriteLine($"note: {c.Path} changed from the checkpoint's {c.Saved} to {c.Now} (allowed by --allow-changed).");
        foreach (var c in changes.Where(c => c.Path is "Data.Prefix" or "Data.Tokenizer"))
            log.WriteLine($"note: {c.Path} changed from the checkpoint's {c.Saved} to {c.Now}; the data order continues exactly only if the files are the same.");
        foreach (var c in changes.Where(c => c.Path == "Training.Precision"))
            log.WriteLine($"note: {c.Path} changed from the checkpoint's {c.Saved} to {c.Now}; the weights are converted, the fp32 optimizer state is kept.");
    }

    private static string Text(JsonNode? value, bool present) => !present ? "absent" : value is null ? "null" : value.ToJsonString();

    private static string Normal(string name) => new string(name.Where(ch => ch is not ('-' or '_' or ' ')).ToArray()).ToLowerInvariant();
}
