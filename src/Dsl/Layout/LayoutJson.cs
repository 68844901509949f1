using System;
using System.IO;

namespace Moe.Dsl.Layout;

/// <summary>
/// Writes a rank layout in the schema of Megatron's rank vectors (shared/vectors/megatron-ranks): the same
/// keys in the same order, compact. The writer streams: memory stays O(largest group) at any world size.
/// </summary>
public static class LayoutJson
{
    /// <summary>The value of the <c>source</c> field.</summary>
    public const string Source = "Moe.Dsl.Layout.RankLayout (Megatron-Core 0.20 semantics)";

    /// <summary>The layout as one JSON object (for small layouts; stream large ones with <see cref="Write(IRankLayout, TextWriter, bool)"/>).</summary>
    public static string Write(IRankLayout layout, bool indented = false)
    {
        using var writer = new StringWriter(System.Globalization.CultureInfo.InvariantCulture);
        Write(layout, writer, indented);
        return writer.ToString();
    }

    /// <summary>
    /// Writes the layout as one JSON object to <paramref name="writer"/>, without a trailing newline: compact, or
    /// indented for reading (one member, group, rank or creation step per line; a group's ranks, a rank's
    /// coordinates and a creation step stay on one line).
    /// </summary>
    public static void Write(IRankLayout layout, TextWriter writer, bool indented = false)
    {
        if (layout is null) throw new ArgumentNullException(nameof(layout));
        if (writer is null) throw new ArgumentNullException(nameof(writer));
        var digits = new char[11];
        string comma = indented ? ", " : ",", colon = indented ? ": " : ":";
        void I(int v) => WriteInt(writer, v, digits);
        // Before an item of a block at this depth: a comma after the previous one, and in indented form a new line.
        void Next(bool first, int depth)
        {
            if (!first) writer.Write(',');
            if (indented)
            {
                writer.Write('\n');
                writer.Write(new string(' ', 2 * depth));
            }
        }
        void Close(char bracket, int depth)
        {
            if (indented)
            {
                writer.Write('\n');
                writer.Write(new string(' ', 2 * depth));
            }
            writer.Write(bracket);
        }
        void Key(string name, bool first, int depth)
        {
            Next(first, depth);
            writer.Write('"');
            writer.Write(name);
            writer.Write('"');
            writer.Write(colon);
        }
        void Field(string name, int value)
        {
            Key(name, false, 1);
            I(value);
        }
        void Text(string name, string value)
        {
            Key(name, false, 1);
            writer.Write('"');
            writer.Write(value);
            writer.Write('"');
        }
        string order = RankLayout.OrderName(layout.Order);

        writer.Write('{');
        Key("source", true, 1);
        writer.Write('"');
        writer.Write(Source);
        writer.Write('"');
        Field("world", layout.World);
        Field("tp", layout.Tensor);
        Field("pp", layout.Pipeline);
        Field("cp", layout.Context);
        Field("ep", layout.Expert);
        Field("etp", layout.ExpertTensor);
        Field("dp", layout.DataParallel);
        Field("edp", layout.ExpertDataParallel);
        Text("order", order);
        Text("expert_order", order);
        Field("gtp_remat", 1);
        Field("num_distributed_optimizer_instances", 1);
        Key("groups", false, 1);
        writer.Write('{');
        for (int k = 0; k < RankLayout.FamilyKeys.Count; k++)
        {
            string key = RankLayout.FamilyKeys[k];
            Key(key, k == 0, 2);
            writer.Write('[');
            int count = layout.GroupCount(key);
            for (int g = 0; g < count; g++)
            {
                Next(g == 0, 3);
                writer.Write('[');
                var members = layout.Group(key, g);
                for (int m = 0; m < members.Length; m++)
                {
                    if (m > 0) writer.Write(comma);
                    I(members[m]);
                }
                writer.Write(']');
            }
            if (count > 0) Close(']', 2);
            else writer.Write(']');
        }
        Close('}', 1);
        Key("coords", false, 1);
        writer.Write('[');
        for (int r = 0; r < layout.World; r++)
        {
            var c = layout.Coordinates(r);
            Next(r == 0, 2);
            writer.Write("{\"tp\"" + colon);
            I(c.Tp);
            writer.Write(comma + "\"cp\"" + colon);
            I(c.Cp);
            writer.Write(comma + "\"dp\"" + colon);
            I(c.Dp);
            writer.Write(comma + "\"pp\"" + colon);
            I(c.Pp);
            writer.Write(comma + "\"dp_cp\"" + colon);
            I(c.DpCp);
            writer.Write(comma + "\"ep\"" + colon);
            I(c.Ep);
            writer.Write(comma + "\"etp\"" + colon);
            I(c.Etp);
            writer.Write(comma + "\"edp\"" + colon);
            I(c.Edp);
            writer.Write('}');
        }
        Close(']', 1);
        Key("creation_order", false, 1);
        writer.Write('[');
        int i = 0;
        foreach (var c in layout.CreationOrder)
        {
            Next(i++ == 0, 2);
            writer.Write("[\"");
            writer.Write(c.Description);
            writer.Write("\"" + comma + "\"");
            writer.Write(c.Backend);
            writer.Write("\"" + comma + "\"");
            writer.Write(c.GroupsKey);
            writer.Write("\"" + comma);
            I(c.FirstIndex);
            writer.Write(comma);
            I(c.Count);
            writer.Write(']');
        }
        Close(']', 1);
        Close('}', 0);
    }

    /// <summary>An int in invariant decimal without allocating (a layout of 131,072 ranks writes millions).</summary>
    private static void WriteInt(TextWriter writer, int value, char[] buffer)
    {
        if (value < 0)
        {
            writer.Write(value.ToString(System.Globalization.CultureInfo.InvariantCulture));
            return;
        }
        int at = buffer.Length;
        do
        {
            buffer[--at] = (char)('0' + value % 10);
            value /= 10;
        }
        while (value > 0);
        writer.Write(buffer, at, buffer.Length - at);
    }
}
