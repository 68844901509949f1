using System.Text;
using System.Xml.Linq;
using Moe.Dsl;

namespace Moe.Runtime.Commands;

/// <summary>
/// The XML documentation of the recipe settings (Moe.Dsl.xml, shipped beside Moe.Dsl.dll): command-line
/// help for an override is the summary of the setting it overrides, so the two never drift apart.
/// </summary>
public static class SettingDocs
{
    private static readonly Lazy<Dictionary<string, string>> Summaries = new(Load);

    /// <summary>The summary of a setting, e.g. "Parallelism.Tensor", as plain text; null when the docs file is absent.</summary>
    public static string? Summary(string settingPath) =>
        Summaries.Value.TryGetValue("P:Moe.Dsl." + settingPath, out var text) ? text : null;

    private static Dictionary<string, string> Load()
    {
        var result = new Dictionary<string, string>(StringComparer.Ordinal);
        string xml = Path.ChangeExtension(typeof(Recipe).Assembly.Location, ".xml");
        if (!File.Exists(xml)) return result;
        foreach (var member in XDocument.Load(xml).Descendants("member"))
        {
            var summary = member.Element("summary");
            if (member.Attribute("name")?.Value is string name && summary is not null) result[name] = Plain(summary);
        }
        return result;
    }

    private static string Plain(XElement summary)
    {
        var sb = new StringBuilder();
        foreach (var node in summary.Nodes())
        {
            sb.Append(node switch
            {
                XText text => text.Value,
                XElement { Name.LocalName: "see" } see => (see.Attribute("cref")?.Value ?? see.Attribute("langword")?.Value ?? "").Split('.', ':').Last(),
                XElement element => element.Value,
                _ => "",
            });
        }
        return string.Join(" ", sb.ToString().Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries));
    }
}
