using System.Globalization;
using System.Linq;
using System.Text;

namespace Moe.Dsl.Layout;

/// <summary>
/// Writes a <see cref="RankLayout"/> in the schema of Megatron's rank vectors
/// (shared/vectors/megatron-ranks): the same keys in the same order, compact.
/// </summary>
public static class LayoutJson
{
    /// <summary>The value of the <c>source</c> field.</summary>
    public const string Source = "Moe.Dsl.Layout.RankLayout (Megatron-Core 0.20 semantics)";

    /// <summary>The layout as one compact JSON object.</summary>
    public static string Write(RankLayout layout)
    {
        var sb = new StringBuilder();
        string I(int v) => v.ToString(CultureInfo.InvariantCulture);
        sb.Append("{\"source\":\"").Append(Source).Append('"');
        sb.Append(",\"world\":").Append(I(layout.World));
        sb.Append(",\"tp\":").Append(I(layout.Tensor));
        sb.Append(",\"pp\":").Append(I(layout.Pipeline));
        sb.Append(",\"cp\":").Append(I(layout.Context));
        sb.Append(",\"ep\":").Append(I(layout.Expert));
        sb.Append(",\"etp\":").Append(I(layout.ExpertTensor));
        sb.Append(",\"dp\":").Append(I(layout.DataParallel));
        sb.Append(",\"edp\":").Append(I(layout.ExpertDataParallel));
        sb.Append(",\"order\":\"").Append(layout.OrderString).Append('"');
        sb.Append(",\"expert_order\":\"").Append(layout.OrderString).Append('"');
        sb.Append(",\"gtp_remat\":1,\"num_distributed_optimizer_instances\":1");
        sb.Append(",\"groups\":{");
        sb.Append(string.Join(",", RankLayout.FamilyKeys.Select(key =>
            "\"" + key + "\":[" + string.Join(",", layout.Groups[key].Select(g => "[" + string.Join(",", g.Select(I)) + "]")) + "]")));
        sb.Append("},\"coords\":[");
        sb.Append(string.Join(",", Enumerable.Range(0, layout.World).Select(r =>
        {
            var c = layout.Coordinates(r);
            return $"{{\"tp\":{I(c.Tp)},\"cp\":{I(c.Cp)},\"dp\":{I(c.Dp)},\"pp\":{I(c.Pp)},\"dp_cp\":{I(c.DpCp)},\"ep\":{I(c.Ep)},\"etp\":{I(c.Etp)},\"edp\":{I(c.Edp)}}}";
        })));
        sb.Append("],\"creation_order\":[");
        sb.Append(string.Join(",", layout.CreationOrder.Select(c =>
            $"[\"{c.Description}\",\"{c.Backend}\",\"{c.GroupsKey}\",{I(c.FirstIndex)},{I(c.Count)}]")));
        sb.Append("]}");
        return sb.ToString();
    }
}
