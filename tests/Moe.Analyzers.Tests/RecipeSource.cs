using System.Globalization;
using System.Reflection;
using System.Text;
using Moe.Dsl;

namespace Moe.Analyzers.Tests;

/// <summary>
/// Writes settings as the source of a [Recipe] class — every value that differs from the default as an
/// initializer assignment — and marks (<c>{|#n:…|}</c>) where the analyzer must report each setting path:
/// its assignment, else the enclosing setting's value, else the class name.
/// </summary>
internal static class RecipeSource
{
    private static readonly (string Name, Func<RecipeSettings, object> Get, object Default)[] Records =
    [
        ("Parallelism", s => s.Parallelism, new Parallelism()),
        ("Router", s => s.Router, new Router()),
        ("Capacity", s => s.Capacity, new Capacity()),
        ("Data", s => s.Data, new Data()),
        ("Training", s => s.Training, new Training()),
        ("Checkpoint", s => s.Checkpoint, new Checkpoint()),
        ("Health", s => s.Health, new Health()),
        ("Recompute", s => s.Recompute, new Recompute()),
    ];

    public static string Render(RecipeSettings s, IReadOnlyList<string> markedPaths, out Dictionary<string, int> markers)
    {
        var assigned = new HashSet<string>();
        var recordWritten = new HashSet<string>();
        var members = new List<(string Record, string Setting, List<(string Path, string Text)> Assignments, string Head)>();

        var (presetName, preset) = s.Model.VocabSize == Model.Mixtral8x22B.VocabSize ? ("Mixtral8x22B", Model.Mixtral8x22B) : ("Mixtral8x7B", Model.Mixtral8x7B);
        var modelAssignments = Differences(s.Model, preset, "Model");
        members.Add(("Model", "Model", modelAssignments, $"Model.{presetName}" + (modelAssignments.Count > 0 ? " with" : "")));
        foreach (var (name, get, def) in Records)
        {
            var a = Differences(get(s), def, name);
            if (a.Count == 0) continue;
            recordWritten.Add(name);
            members.Add((name, name, a, "new()"));
        }
        foreach (var m in members) foreach (var a in m.Assignments) assigned.Add(a.Path);

        markers = new Dictionary<string, int>();
        var target = new Dictionary<string, string>(); // path → where it is reported: a path, a record, or "class"
        foreach (var path in markedPaths)
        {
            string record = path.Split('.')[0];
            target[path] = assigned.Contains(path) ? path : recordWritten.Contains(record) || record == "Model" ? record : "class";
        }
        var order = target.Values.Distinct().ToList();
        foreach (var (path, where) in target) markers[path] = order.IndexOf(where);
        string Mark(string key, string text) => order.Contains(key) ? $"{{|#{order.IndexOf(key)}:{text}|}}" : text;

        var sb = new StringBuilder();
        sb.Append("[Recipe]\npublic sealed partial class ").Append(Mark("class", "R")).Append(" : Recipe\n{\n");
        foreach (var m in members)
        {
            string body = m.Assignments.Count == 0 ? m.Head
                : m.Head + " { " + string.Join(", ", m.Assignments.Select(a => Mark(a.Path, a.Text))) + " }";
            sb.Append($"    public override {m.Setting} {m.Setting} => {Mark(m.Record, body)};\n");
        }
        sb.Append("}\n");
        return sb.ToString();
    }

    private static List<(string Path, string Text)> Differences(object value, object defaults, string record)
    {
        var list = new List<(string, string)>();
        foreach (var p in value.GetType().GetProperties(BindingFlags.Public | BindingFlags.Instance).Where(p => p.SetMethod is not null))
        {
            object? v = p.GetValue(value), d = p.GetValue(defaults);
            if (Equals(v, d) || v is null) continue;
            list.Add(($"{record}.{p.Name}", $"{p.Name} = {Literal(v)}"));
        }
        return list;
    }

    private static string Literal(object v) => v switch
    {
        bool b => b ? "true" : "false",
        string str => "\"" + str.Replace("\"", "\\\"") + "\"",
        double d => d.ToString("R", CultureInfo.InvariantCulture),
        int i => i.ToString(CultureInfo.InvariantCulture),
        Enum e => $"{e.GetType().Name}.{e}",
        _ => throw new ArgumentException($"cannot write {v.GetType()} as a literal"),
    };
}
