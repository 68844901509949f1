using System.Text.Json;

namespace Moe.Runtime;

/// <summary>Reads a JSON file the user supplied (config.json, tokenizer.json, an index); a malformed file is a <see cref="UserError"/> naming it.</summary>
public static class JsonFile
{
    public static JsonDocument Parse(string path)
    {
        try
        {
            return JsonDocument.Parse(File.ReadAllText(path));
        }
        catch (JsonException e)
        {
            throw new UserError($"{path}: not valid JSON ({e.Message}).");
        }
    }
}
