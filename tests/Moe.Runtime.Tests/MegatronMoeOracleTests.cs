using System.Text.Json;
using Moe.Dsl;
using Moe.Runtime.Checkpoints;
using Moe.Runtime.MixtureOfExperts;
using Moe.Tests;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Moe.Runtime.Tests;

/// <summary>
/// Megatron-Core 0.20's own MoE layer (local spec, SequentialMLP, all-to-all dispatcher, expert parallel 1) is
/// the oracle: bench/gpu/megatron_moe_oracle.py ran it on the GPU host in float32 on fixed weights and inputs
/// and wrote tests/fixtures/megatron-moe/&lt;case&gt;.safetensors and cases.json. Each case builds our
/// <see cref="MoeLayer"/> with the same settings (<see cref="AuxLossConvention.Megatron"/>), runs the same
/// micro-batches forward and backward in float32 on the CPU, and compares everything Megatron produced.
/// </summary>
/// <remarks>
/// <para>
/// Layout: Megatron's hidden states are [S, B, H] and its router sees tokens in the order s·B + b; ours are
/// batch-major (b·S + s). Inputs are transposed to [B, S, H] before flattening, outputs and input gradients
/// back to [S, B, H], and per-token router tensors are re-ordered to Megatron's rows before comparing.
/// </para>
/// <para>
/// Losses: the script reads the aux and z losses from Megatron's MoE metrics tracker, which records
/// loss / coefficient for the layer; with one layer (num_layers = 1) and tensor × context parallel 1 nothing
/// else scales them, so they compare with <see cref="MoeLayer.MegatronAuxLoss"/> and <see cref="AuxLosses.ZLoss"/>
/// before their coefficients. Megatron's backward includes both losses through MoEAuxLossAutoScaler at
/// scale 1, so ours back-propagates Σ output·upstream + aux_coeff·aux + z_coeff·z for each micro-batch.
/// </para>
/// <para>
/// Tolerances: routing decisions, kept pairs and tokens per expert must be equal; every floating-point
/// tensor must agree to ‖ours − Megatron‖ / ‖Megatron‖ ≤ 1e-5 (norm-wise, so that entries near zero do not
/// dominate; fp32 on a GPU without TF32 against fp32 on a CPU differ by summation order, about 1e-7), and
/// scalars to |ours − Megatron| / |Megatron| ≤ 1e-5. The script refuses seeds whose top-k, group or capacity
/// decisions are within 1e-4 of a tie, so rounding cannot flip a decision.
/// </para>
/// </remarks>
public class MegatronMoeOracleTests
{
    private const double Tolerance = 1e-5;

    private static string FixtureDir => Path.Combine(TestPaths.RepoRoot, "tests", "fixtures", "megatron-moe");

    /// <summary>The cases bench/gpu/megatron_moe_oracle.py writes (CASES there).</summary>
    public static TheoryData<string> Cases() => new(
        "dropless", "capacity_probs", "capacity_position", "pad_to_capacity", "sigmoid_expert_bias", "group_limited",
        "group_limited_sigmoid_bias", "router_fp64_pre_softmax", "aux_loss", "seq_aux_loss", "global_aux_loss");

    [Theory]
    [MemberData(nameof(Cases))]
    public void MoeLayer_EqualsMegatronCore(string name)
    {
        string file = Path.Combine(FixtureDir, name + ".safetensors");
        string manifest = Path.Combine(FixtureDir, "cases.json");
        if (!File.Exists(file) || !File.Exists(manifest))
            Assert.Skip($"fixture tests/fixtures/megatron-moe/{name}.safetensors not generated yet: run bench/gpu/megatron_moe_oracle.py on the GPU host (see its header)");

        using var doc = JsonFile.Parse(manifest);
        Assert.True(doc.RootElement.GetProperty("cases").TryGetProperty(name, out var spec), $"{manifest} has no case '{name}'");
        var c = Case.From(spec);
        using var fixture = SafetensorsFile.Open(file);
        using var scope = torch.NewDisposeScope();
        using var layer = new MoeLayer(c.E, c.H, c.F, c.Options, ScalarType.Float32, CPU);
        layer.train();
        LoadWeights(layer, fixture, c);

        for (int m = 0; m < c.MicroBatches; m++)
        {
            var xSBH = fixture.Read($"input.{m}");
            var x = xSBH.transpose(0, 1).reshape(c.B * c.S, c.H).detach().requires_grad_(true);
            var o = layer.Forward(x, c.B);

            Close(ToMegatronRows(o.Routing.LogitsTE, c), fixture.Read($"router_logits.{m}"), $"router logits, micro-batch {m}");
            var (keptTE, probsTE) = DenseRouting(o, c);
            var expectedProbs = fixture.Read($"routing_probs.{m}");
            Assert.Equal(expectedProbs.ne(0).to(ScalarType.Int64).data<long>().ToArray(), keptTE.data<long>().ToArray());
            Close(probsTE, expectedProbs, $"routing probs, micro-batch {m}");
            Assert.Equal(fixture.Read($"tokens_per_expert.{m}").data<long>().ToArray(), o.Dispatch.RowsPerExpertE.data<long>().ToArray());

            var outSBH = o.HiddenTH.view(c.B, c.S, c.H).transpose(0, 1);
            Close(outSBH, fixture.Read($"output.{m}"), $"output, micro-batch {m}");

            var total = (outSBH * fixture.Read($"upstream_grad.{m}")).sum();
            if (c.Options.LoadBalancing != LoadBalancing.None)
            {
                var aux = layer.MegatronAuxLoss(o, c.B);
                CloseScalar(aux.item<float>(), fixture.Read($"aux_loss.{m}").item<float>(), $"aux loss ({c.Options.LoadBalancing}), micro-batch {m}");
                total = total + c.AuxCoeff * aux;
            }
            if (c.ZCoeff is double zc)
            {
                var z = AuxLosses.ZLoss(o.Routing.LogitsTE);
                CloseScalar(z.to(ScalarType.Float64).item<double>(), fixture.Read($"z_loss.{m}").item<float>(), $"z loss, micro-batch {m}");
                total = total + zc * z;
            }
            total.backward();
            Close(x.grad!.view(c.B, c.S, c.H).transpose(0, 1), fixture.Read($"input_grad.{m}"), $"input gradient, micro-batch {m}");
        }

        Close(layer.Gate.grad!, fixture.Read("grad.gate.weight"), "gate.weight gradient");
        var gateUp = layer.ExpertWeights.GateUp.grad!;
        var down = layer.ExpertWeights.Down.grad!;
        for (int e = 0; e < c.E; e++)
        {
            Close(gateUp[e].narrow(0, 0, c.F), fixture.Read($"grad.experts.{e}.w1.weight"), $"experts.{e}.w1 gradient");
            Close(gateUp[e].narrow(0, c.F, c.F), fixture.Read($"grad.experts.{e}.w3.weight"), $"experts.{e}.w3 gradient");
            Close(down[e], fixture.Read($"grad.experts.{e}.w2.weight"), $"experts.{e}.w2 gradient");
        }

        if (c.Options.ExpertBias)
        {
            Assert.Equal(fixture.Read("expert_bias_counts").data<float>().ToArray(), layer.ExpertBias!.CountsE.data<float>().ToArray());
            layer.UpdateExpertBias();
            Close(layer.ExpertBias.BiasE, fixture.Read("expert_bias_updated"), "updated expert bias");
        }
    }

    /// <summary>The settings of one case, from cases.json (Megatron's TransformerConfig arguments).</summary>
    private sealed record Case(int S, int B, int H, int F, int E, int MicroBatches, MoeOptions Options, double AuxCoeff, double? ZCoeff)
    {
        /// <summary>Every config key the script may write; an unknown one fails the test rather than being ignored.</summary>
        private static readonly HashSet<string> Known =
        [
            "num_layers", "hidden_size", "ffn_hidden_size", "moe_ffn_hidden_size", "num_attention_heads", "num_moe_experts",
            "moe_router_topk", "normalization", "gated_linear_unit", "add_bias_linear", "bias_activation_fusion", "hidden_dropout",
            "attention_dropout", "moe_grouped_gemm", "moe_token_dispatcher_type", "moe_permute_fusion", "moe_router_fusion",
            "tensor_model_parallel_size", "expert_model_parallel_size", "sequence_parallel", "bf16", "fp16",
            "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_router_score_function",
            "moe_router_pre_softmax", "moe_router_dtype", "moe_router_num_groups", "moe_router_group_topk",
            "moe_router_enable_expert_bias", "moe_router_bias_update_rate", "moe_expert_capacity_factor",
            "moe_token_drop_policy", "moe_pad_expert_input_to_capacity",
        ];

        public static Case From(JsonElement spec)
        {
            var cfg = spec.GetProperty("config");
            var unknown = cfg.EnumerateObject().Select(p => p.Name).Where(n => !Known.Contains(n)).ToArray();
            Assert.True(unknown.Length == 0, $"cases.json sets {string.Join(", ", unknown)}, which this test does not map to MoeOptions");
            var sizes = spec.GetProperty("sizes");
            int Size(string n) => sizes.GetProperty(n).GetInt32();
            JsonElement? Get(string n) => cfg.TryGetProperty(n, out var v) && v.ValueKind != JsonValueKind.Null ? v : null;
            Assert.Equal(1, Get("num_layers")!.Value.GetInt32());
            Assert.Equal(Size("E"), Get("num_moe_experts")!.Value.GetInt32());
            Assert.False(Get("add_bias_linear")!.Value.GetBoolean());
            Assert.True(Get("gated_linear_unit")!.Value.GetBoolean());

            string lb = Get("moe_router_load_balancing_type")?.GetString() ?? "aux_loss";
            var options = new MoeOptions
            {
                TopK = Get("moe_router_topk")!.Value.GetInt32(),
                ScoreFunction = (Get("moe_router_score_function")?.GetString() ?? "softmax") switch
                {
                    "softmax" => ScoreFunction.Softmax,
                    "sigmoid" => ScoreFunction.Sigmoid,
                    var other => throw new InvalidOperationException($"score function {other} has no Moe equivalent"),
                },
                PreSoftmax = Get("moe_router_pre_softmax")?.GetBoolean() ?? false,
                RouterDtype = Get("moe_router_dtype")?.GetString() switch { null => null, "fp32" => RouterDtype.Fp32, "fp64" => RouterDtype.Fp64, var d => throw new InvalidOperationException($"router dtype {d}") },
                NumGroups = Get("moe_router_num_groups")?.GetInt32(),
                GroupTopK = Get("moe_router_group_topk")?.GetInt32(),
                ExpertBias = Get("moe_router_enable_expert_bias")?.GetBoolean() ?? false,
                BiasUpdateRate = Get("moe_router_bias_update_rate")?.GetDouble() ?? 1e-3,
                CapacityFactor = Get("moe_expert_capacity_factor")?.GetDouble(),
                DropPolicy = (Get("moe_token_drop_policy")?.GetString() ?? "probs") == "probs" ? DropPolicy.Probs : DropPolicy.Position,
                PadToCapacity = Get("moe_pad_expert_input_to_capacity")?.GetBoolean() ?? false,
                LoadBalancing = lb switch
                {
                    "aux_loss" => LoadBalancing.AuxLoss,
                    "seq_aux_loss" => LoadBalancing.SeqAuxLoss,
                    "global_aux_loss" => LoadBalancing.GlobalAuxLoss,
                    "none" => LoadBalancing.None,
                    _ => throw new InvalidOperationException($"load balancing {lb} has no Moe equivalent"),
                },
                AuxLossConvention = AuxLossConvention.Megatron,
                ZLoss = Get("moe_z_loss_coeff") is not null,
            };
            return new Case(Size("S"), Size("B"), Size("H"), Size("F"), Size("E"), spec.GetProperty("microbatches").GetInt32(), options,
                Get("moe_aux_loss_coeff")?.GetDouble() ?? 0, Get("moe_z_loss_coeff")?.GetDouble());
        }
    }

    private static void LoadWeights(MoeLayer layer, SafetensorsFile fixture, Case c)
    {
        using var _ = torch.no_grad();
        layer.Gate.copy_(fixture.Read("gate.weight"));
        for (int e = 0; e < c.E; e++)
        {
            layer.ExpertWeights.GateUp[e].narrow(0, 0, c.F).copy_(fixture.Read($"experts.{e}.w1.weight"));
            layer.ExpertWeights.GateUp[e].narrow(0, c.F, c.F).copy_(fixture.Read($"experts.{e}.w3.weight"));
            layer.ExpertWeights.Down[e].copy_(fixture.Read($"experts.{e}.w2.weight"));
        }
        if (c.Options.ExpertBias) layer.ExpertBias!.BiasE.copy_(fixture.Read("expert_bias"));
    }

    /// <summary>Rows of a per-token tensor [B·S, …] (ours) in Megatron's order s·B + b.</summary>
    private static Tensor ToMegatronRows(Tensor batchMajor, Case c) =>
        batchMajor.view(c.B, c.S, -1).transpose(0, 1).reshape(c.S * c.B, -1);

    /// <summary>
    /// Our kept (token, expert) pairs and their combine weights as Megatron's dense [T, E] routing map and probs
    /// after capacity (padding rows carry weight 0 and are left out, as Megatron's padded slots carry prob 0).
    /// </summary>
    private static (Tensor KeptTE, Tensor ProbsTE) DenseRouting(MoeLayerOutput o, Case c)
    {
        var d = o.Dispatch;
        long tokens = c.B * c.S;
        var expertOfRow = torch.repeat_interleave(torch.arange(c.E), d.RowsPerExpertE);
        var real = d.WeightOfRowR.ne(0);
        var flat = d.TokenOfRowR.masked_select(real) * c.E + expertOfRow.masked_select(real);
        var kept = torch.zeros(tokens * c.E, dtype: ScalarType.Int64).index_fill_(0, flat, 1).view(tokens, c.E);
        var probs = torch.zeros(tokens * c.E, dtype: d.WeightOfRowR.dtype).index_put_(d.WeightOfRowR.masked_select(real), flat).view(tokens, c.E);
        return (ToMegatronRows(kept, c), ToMegatronRows(probs, c));
    }

    private static void Close(Tensor actual, Tensor expected, string what)
    {
        Assert.Equal(expected.shape, actual.shape);
        var e = expected.to(ScalarType.Float64);
        double err = (actual.detach().to(ScalarType.Float64) - e).norm().item<double>() / Math.Max(e.norm().item<double>(), 1e-30);
        Assert.True(err <= Tolerance, $"{what}: relative error {err:G3} > {Tolerance:G1}");
    }

    private static void CloseScalar(double actual, double expected, string what)
    {
        double err = Math.Abs(actual - expected) / Math.Max(Math.Abs(expected), 1e-30);
        Assert.True(err <= Tolerance, $"{what}: ours {actual:G9}, Megatron {expected:G9} (relative error {err:G3})");
    }
}
