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

    /// <summary>The layout as one compact JSON object (for small layouts; stream large ones with <see cref="Write(IRankLayout, TextWriter)"/>).</summary>
    public static string Write(IRankLayout layout)
    {
        using var writer = new StringWriter(System.Globalization.CultureInfo.InvariantCulture);
        Write(layout, writer);
        return writer.ToString();
    }

    /// <summary>Writes the layout as one compact JSON object to <paramref name="writer"/>, without a trailing newline.</summary>
    public static void Write(IRankLayout layout, TextWriter writer)
    {
        if (layout is null) throw new ArgumentNullException(nameof(layout));
        if (writer is null) throw new ArgumentNullException(nameof(writer));
        var digits = new char[11];
        void I(int v) => WriteInt(writer, v, digits);
        void Field(string name, int value)
        {
            writer.Write(",\"");
            writer.Write(name);
            writer.Write("\":");
            I(value);
        }
        string order = RankLayout.OrderName(layout.Order);

        writer.Write("{\"source\":\"");
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
        writer.Write(",\"order\":\"");
        writer.Write(order);
        writer.Write("\",\"expert_order\":\"");
        writer.Write(order);
        writer.Write("\",\"gtp_remat\":1,\"num_distributed_optimizer_instances\":1");
        writer.Write(",\"groups\":{");
        for (int k = 0; k < RankLayout.FamilyKeys.Count; k++)
        {
            string key = RankLayout.FamilyKeys[k];
            if (k > 0) writer.Write(',');
            writer.Write('"');
            writer.Write(key);
            writer.Write("\":[");
            int count = layout.GroupCount(key);
            for (int g = 0; g < count; g++)
            {
                if (g > 0) writer.Write(',');
                writer.Write('[');
                var members = layout.Group(key, g);
                for (int m = 0; m < members.Length; m++)
                {
                    if (m > 0) writer.Write(',');
                    I(members[m]);
                }
                writer.Write(']');
            }
            writer.Write(']');
        }
        writer.Write("},\"coords\":[");
        for (int r = 0; r < layout.World; r++)
        {
            var c = layout.Coordinates(r);
            writer.Write(r > 0 ? ",{\"tp\":" : "{\"tp\":");
            I(c.Tp);
            writer.Write(",\"cp\":");
            I(c.Cp);
            writer.Write(",\"dp\":");
            I(c.Dp);
            writer.Write(",\"pp\":");
            I(c.Pp);
            writer.Write(",\"dp_cp\":");
            I(c.DpCp);
            writer.Write(",\"ep\":");
            I(c.Ep);
            writer.Write(",\"etp\":");
            I(c.Etp);
            writer.Write(",\"edp\":");
            I(c.Edp);
            writer.Write('}');
        }
        writer.Write("],\"creation_order\":[");
        int i = 0;
        foreach (var c in layout.CreationOrder)
        {
            writer.Write(i++ > 0 ? ",[\"" : "[\"");
            writer.Write(c.Description);
            writer.Write("\",\"");
            writer.Write(c.Backend);
            writer.Write("\",\"");
            writer.Write(c.GroupsKey);
            writer.Write("\",");
            I(c.FirstIndex);
            writer.Write(',');
            I(c.Count);
            writer.Write(']');
        }
        writer.Write("]}");
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
