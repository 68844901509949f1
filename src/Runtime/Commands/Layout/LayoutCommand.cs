using System.Text;
using System.Text.Json.Nodes;
using Moe.Dsl;
using Moe.Dsl.Layout;

namespace Moe.Runtime.Commands.Layout;

/// <summary>Validates a bare layout with the rule set and prints Megatron's groups for it.</summary>
public static class LayoutCommand
{
    /// <summary>Settings a bare layout does not have; the rules that read them are skipped.</summary>
    private static readonly string[] NotGiven =
        ["Model", "Router", "Capacity", "Data", "Training", "Checkpoint", "Parallelism.SequenceParallel"];

    public static int Execute(Parallelism parallelism, bool json, TextWriter output)
    {
        var settings = new RecipeSettings { Name = "This layout", Parallelism = parallelism, Unknown = NotGiven };
        RecipeFindings.ThrowIfInvalid(settings);
        var layout = new RankLayout(parallelism.Gpus, parallelism.Tensor, parallelism.Pipeline, parallelism.Context,
            parallelism.Expert, parallelism.EffectiveExpertTensor, parallelism.Order);
        output.WriteLine(json ? Indent(JsonNode.Parse(LayoutJson.Write(layout))!) : Render(layout));
        return 0;
    }

    private static readonly System.Text.Json.JsonSerializerOptions Relaxed = new() { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    /// <summary>
    /// The JSON indented for reading, one member or element per line, except that an array or object of plain
    /// values (a group's ranks, a rank's coordinates, a creation step) stays on one line.
    /// </summary>
    public static string Indent(JsonNode node)
    {
        var sb = new StringBuilder();
        Write(node, 0);
        return sb.ToString();

        void Write(JsonNode? n, int depth)
        {
            string pad = new(' ', 2 * (depth + 1)), close = new(' ', 2 * depth);
            switch (n)
            {
                case JsonObject o when IsFlat(o):
                    sb.Append('{').Append(string.Join(", ", o.Select(kv => Key(kv.Key) + ": " + Scalar(kv.Value)))).Append('}');
                    break;
                case JsonArray a when IsFlat(a):
                    sb.Append('[').Append(string.Join(", ", a.Select(Scalar))).Append(']');
                    break;
                case JsonObject o:
                    sb.Append("{\n");
                    int i = 0;
                    foreach (var (key, value) in o)
                    {
                        sb.Append(pad).Append(Key(key)).Append(": ");
                        Write(value, depth + 1);
                        sb.Append(++i < o.Count ? ",\n" : "\n");
                    }
                    sb.Append(close).Append('}');
                    break;
                case JsonArray a:
                    sb.Append("[\n");
                    for (int k = 0; k < a.Count; k++)
                    {
                        sb.Append(pad);
                        Write(a[k], depth + 1);
                        sb.Append(k + 1 < a.Count ? ",\n" : "\n");
                    }
                    sb.Append(close).Append(']');
                    break;
                default:
                    sb.Append(Scalar(n));
                    break;
            }
        }

        static bool IsFlat(JsonNode n) => n switch
        {
            JsonObject o => o.All(kv => kv.Value is null or JsonValue),
            JsonArray a => a.All(e => e is null or JsonValue),
            _ => true,
        };

        static string Key(string key) => JsonValue.Create(key).ToJsonString(Relaxed);

        static string Scalar(JsonNode? n) => n?.ToJsonString(Relaxed) ?? "null";
    }

    /// <summary>A readable table: sizes, every group family, and per-rank coordinates.</summary>
    public static string Render(RankLayout layout)
    {
        var sb = new StringBuilder();
        sb.Append($"world {layout.World}: tp {layout.Tensor}, pp {layout.Pipeline}, cp {layout.Context}, ep {layout.Expert}, etp {layout.ExpertTensor}, ")
          .Append($"dp {layout.DataParallel}, edp {layout.ExpertDataParallel}, order {layout.OrderString}\n\ngroups\n");
        foreach (var key in RankLayout.FamilyKeys)
        {
            var groups = layout.Groups[key];
            string body = string.Join(" ", groups.Select(g => "[" + string.Join(",", g) + "]"));
            sb.Append("  ").Append(key.PadRight(20)).Append($"{groups.Length} × {groups[0].Length}: ").Append(body).Append('\n');
        }
        sb.Append("\nrank   tp  cp  dp  pp  dp_cp  ep  etp  edp\n");
        for (int r = 0; r < layout.World; r++)
        {
            var c = layout.Coordinates(r);
            sb.Append($"{r,4}  {c.Tp,3} {c.Cp,3} {c.Dp,3} {c.Pp,3} {c.DpCp,6} {c.Ep,3} {c.Etp,4} {c.Edp,4}\n");
        }
        sb.Append("\ncommunicator creation order\n");
        foreach (var c in layout.CreationOrder)
            sb.Append($"  {c.Description} ({c.Backend}) {c.GroupsKey}[{c.FirstIndex}..{c.FirstIndex + c.Count - 1}]\n");
        return sb.ToString();
    }
}
