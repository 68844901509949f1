// Kernel probe: times the building blocks of a Mixtral layer through TorchSharp on the current device
// (forward + backward, bf16, median of 10 after 3 warm-ups), to choose how the runtime computes experts,
// attention and the LM head. Not a test. Usage: KernelProbe [cpu|cuda] [tokens]
using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

var device = args.Length > 0 && args[0] == "cuda" ? CUDA : CPU;
int tokens = args.Length > 1 ? int.Parse(args[1]) : (device.type == DeviceType.CUDA ? 4096 : 64);
bool small = device.type != DeviceType.CUDA;
int H = small ? 64 : 4096, I = small ? 96 : 14336, E = 8, K = 2, heads = small ? 4 : 32, kv = small ? 2 : 8, d = small ? 16 : 128, V = small ? 512 : 32000;
var dt = small ? float32 : bfloat16;
Console.WriteLine($"device {device.type}, tokens {tokens}, H {H}, I {I}, E {E}, top-{K}, {dt}");
torch.manual_seed(0);

var cu = torch.jit.compile(@"
def grouped(x: Tensor, w13: Tensor, w2: Tensor, offs: Tensor) -> Tensor:
    gu = torch._grouped_mm(x, w13, offs)
    g, u = gu.chunk(2, dim=-1)
    return torch._grouped_mm(torch.silu(g) * u, w2, offs)

def looped(x: Tensor, w13: Tensor, w2: Tensor, counts: Tensor) -> Tensor:
    sizes: List[int] = counts.tolist()
    xs = torch.split(x, sizes)
    outs: List[Tensor] = []
    for e in range(len(sizes)):
        gu = torch.mm(xs[e], w13[e])
        g, u = gu.chunk(2, dim=-1)
        outs.append(torch.mm(torch.silu(g) * u, w2[e]))
    return torch.cat(outs)

def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.scaled_dot_product_attention(q, k, v, None, 0.0, True, enable_gqa=True)

def rmsnorm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return torch.rms_norm(x, [x.size(-1)], w, eps)

def sdpa_cudnn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    rep = q.size(1) // k.size(1)
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    return torch._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True, False)[0]

def sdpa_cudnn_gqa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True, False)[0]

def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

def combine(ys: Tensor, inverse: Tensor, weights: Tensor, k: int) -> Tensor:
    t = weights.size(0)
    return torch.bmm(weights.unsqueeze(1), ys.index_select(0, inverse).view(t, k, -1)).squeeze(1)
");

double Time(string name, double flops, Action step)
{
    for (int i = 0; i < 3; i++) step();
    if (device.type == DeviceType.CUDA) torch.cuda.synchronize();
    var times = new List<double>();
    for (int i = 0; i < 10; i++)
    {
        var sw = Stopwatch.StartNew();
        step();
        if (device.type == DeviceType.CUDA) torch.cuda.synchronize();
        times.Add(sw.Elapsed.TotalSeconds);
    }
    times.Sort();
    double t = times[5];
    Console.WriteLine($"{name,-48} {t * 1e3,9:F3} ms {flops / t / 1e12,8:F1} TFLOP/s");
    return t;
}

// 1. Plain matmul ceiling.
{
    int n = small ? 256 : 8192;
    using var a = randn(n, n, dtype: dt, device: device);
    using var b = randn(n, n, dtype: dt, device: device);
    Time($"matmul {n}^3 (forward only)", 2.0 * n * n * n, () => { using var _ = NewDisposeScope(); a.matmul(b); });
}

// Routing: top-2 of random logits, tokens sorted by expert.
using var logits = randn(tokens, E, device: device);
var (_, ids) = logits.topk(K, dim: -1);
using var flatIds = ids.flatten();
var (sortedIds, order) = flatIds.sort(stable: true);
using var counts = torch.bincount(flatIds, minlength: E);
using var offs = counts.cumsum(0).to(int32);
long rows = tokens * K;
double expertFlops = 3 * 2.0 * rows * H * (3.0 * I); // fwd + bwd of three H×I matmuls per routed row
using var xRows = randn(rows, H, dtype: dt, device: device) * 0.1;
using var w13 = (randn(E, H, 2 * I, dtype: dt, device: device) * 0.02).requires_grad_();
using var w2 = (randn(E, I, H, dtype: dt, device: device) * 0.02).requires_grad_();
using var w13hf = (randn(E, 2 * I, H, dtype: dt, device: device) * 0.02).requires_grad_();
using var w2hf = (randn(E, H, I, dtype: dt, device: device) * 0.02).requires_grad_();
using var gradOut = randn(rows, H, dtype: dt, device: device);
Console.WriteLine("tokens per expert: " + string.Join(" ", counts.cpu().data<long>().ToArray()));

void ExpertStep(Func<Tensor, Tensor> f, params Tensor[] weights)
{
    using var _ = NewDisposeScope();
    var x = xRows.detach().requires_grad_();
    var y = f(x);
    y.backward(new[] { gradOut });
    foreach (var w in weights) w.grad = null;
}

Time("experts: _grouped_mm, [E,H,2I] weights", expertFlops, () => ExpertStep(x => cu.invoke<Tensor>("grouped", x, w13, w2, offs), w13, w2));
try
{
    Time("experts: _grouped_mm, HF [E,2I,H] transposed", expertFlops, () => ExpertStep(x => cu.invoke<Tensor>("grouped", x, w13hf.transpose(1, 2), w2hf.transpose(1, 2), offs), w13hf, w2hf));
}
catch (Exception e) { Console.WriteLine("grouped HF layout failed: " + e.Message.Split('\n')[0]); }
Time("experts: loop in TorchScript (tolist sync)", expertFlops, () => ExpertStep(x => cu.invoke<Tensor>("looped", x, w13, w2, counts), w13, w2));
Time("experts: loop in C# (host counts)", expertFlops, () => ExpertStep(x =>
{
    long[] c = counts.cpu().data<long>().ToArray();
    var xs = x.split(c);
    var outs = new Tensor[E];
    for (int e = 0; e < E; e++)
    {
        var gu = xs[e].mm(w13[e]);
        var gs = gu.chunk(2, -1);
        outs[e] = (nn.functional.silu(gs[0]) * gs[1]).mm(w2[e]);
    }
    return torch.cat(outs);
}, w13, w2));
Time("experts: loop in C#, HF layout (x @ W^T)", expertFlops, () => ExpertStep(x =>
{
    long[] c = counts.cpu().data<long>().ToArray();
    var xs = x.split(c);
    var outs = new Tensor[E];
    for (int e = 0; e < E; e++)
    {
        var gu = xs[e].mm(w13hf[e].t());
        var gs = gu.chunk(2, -1);
        outs[e] = (nn.functional.silu(gs[0]) * gs[1]).mm(w2hf[e].t());
    }
    return torch.cat(outs);
}, w13hf, w2hf));

// Attention.
{
    using var q = randn(1, heads, tokens, d, dtype: dt, device: device).requires_grad_();
    using var k = randn(1, kv, tokens, d, dtype: dt, device: device).requires_grad_();
    using var v = randn(1, kv, tokens, d, dtype: dt, device: device).requires_grad_();
    using var g = randn(1, heads, tokens, d, dtype: dt, device: device);
    double attnFlops = 3 * 2 * 2.0 * tokens * tokens * heads * d * 0.5;
    Time("sdpa causal GQA (TorchScript enable_gqa)", attnFlops, () => { using var _ = NewDisposeScope(); cu.invoke<Tensor>("sdpa", q, k, v).backward(new[] { g }); q.grad = null; k.grad = null; v.grad = null; });
    foreach (var fn in new[] { "sdpa_cudnn", "sdpa_cudnn_gqa" })
    {
        try { Time($"{fn} (TorchScript)", attnFlops, () => { using var _ = NewDisposeScope(); cu.invoke<Tensor>(fn, q, k, v).backward(new[] { g }); q.grad = null; k.grad = null; v.grad = null; }); }
        catch (Exception e) { Console.WriteLine($"{fn} failed: " + e.Message.Split('\n')[0]); }
    }
    Time("sdpa causal, repeat_interleave KV", attnFlops, () =>
    {
        using var _ = NewDisposeScope();
        nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(heads / kv, dim: 1), v.repeat_interleave(heads / kv, dim: 1), is_casual: true).backward(new[] { g });
        q.grad = null; k.grad = null; v.grad = null;
    });
}

// Dense projections and the LM head with cross-entropy.
{
    using var x = randn(tokens, H, dtype: dt, device: device);
    using var wqkv = (randn(H + 2 * kv * d, H, dtype: dt, device: device) * 0.02).requires_grad_();
    using var g = randn(tokens, H + 2 * kv * d, dtype: dt, device: device);
    Time("qkv projection x @ W^T", 3 * 2.0 * tokens * H * (H + 2 * kv * d), () => { using var _ = NewDisposeScope(); nn.functional.linear(x.requires_grad_(), wqkv).backward(new[] { g }); wqkv.grad = null; });
    using var head = (randn(V, H, dtype: dt, device: device) * 0.02).requires_grad_();
    using var labels = randint(0, V, new long[] { tokens }, device: device);
    Time("lm head + cross-entropy (fp32 logits)", 3 * 2.0 * tokens * H * V, () =>
    {
        using var _ = NewDisposeScope();
        var l = nn.functional.linear(x, head);
        nn.functional.cross_entropy(l.to(float32), labels).backward();
        head.grad = null;
    });
    Time("lm head + cross-entropy (bf16 logits)", 3 * 2.0 * tokens * H * V, () =>
    {
        using var _ = NewDisposeScope();
        var l = nn.functional.linear(x, head);
        nn.functional.cross_entropy(l, labels).backward();
        head.grad = null;
    });
    using var w = ones(H, dtype: dt, device: device).requires_grad_();
    using var gx = randn(tokens, H, dtype: dt, device: device);
    Time("rms_norm (TorchScript) fwd+bwd", 0, () => { using var _ = NewDisposeScope(); cu.invoke<Tensor>("rmsnorm", x.requires_grad_(), w, 1e-5).backward(new[] { gx }); w.grad = null; });
    Time("rms_norm (5 TorchSharp ops) fwd+bwd", 0, () =>
    {
        using var _ = NewDisposeScope();
        var xf = x.requires_grad_().to(float32);
        var y = w * (xf * torch.rsqrt(xf.pow(2).mean(new long[] { -1 }, keepdim: true) + 1e-5)).to(dt);
        y.backward(new[] { gx }); w.grad = null;
    });
}

// 4. A whole Mixtral training step (forward + backward, no optimizer) of `layers` layers, as the
//    runtime would compute it, with each expert strategy: the number to compare with transformers.
var variants = new (string Name, string Strategy, string Attn, bool ScriptRope, bool Bmm, bool Bf16Ce)[]
{
    ("grouped", "grouped", "sdpa", false, false, false),
    ("grouped + cudnn attention", "grouped", "sdpa_cudnn_gqa", false, false, false),
    ("grouped + cudnn(expanded kv)", "grouped", "sdpa_cudnn", false, false, false),
    ("grouped + script rope + bmm combine", "grouped", "sdpa", true, true, false),
    ("grouped + all of the above best + bf16 CE", "grouped", "sdpa_cudnn_gqa", true, true, true),
    ("loop", "loop", "sdpa", false, false, false),
};
foreach (var variant in variants)
{
    string strategy = variant.Strategy;
    try
    {
        using var _ = NewDisposeScope();
        cu.invoke<Tensor>(variant.Attn, randn(1, heads, 64, d, dtype: dt, device: device), randn(1, kv, 64, d, dtype: dt, device: device), randn(1, kv, 64, d, dtype: dt, device: device));
    }
    catch (Exception e)
    {
        Console.WriteLine($"step variant '{variant.Name}' skipped: {variant.Attn} failed: {e.Message.Split('\n')[0]}");
        continue;
    }
    int layers = 2;
    var p = new List<Tensor>();
    Tensor P(params long[] shape) { var t = (randn(shape, dtype: dt, device: device) * 0.02).requires_grad_(); p.Add(t); return t; }
    Tensor Ones(long n) { var t = ones(n, dtype: dt, device: device).requires_grad_(); p.Add(t); return t; }
    var embed = P(V, H);
    var L = Enumerable.Range(0, layers).Select(_ => (inW: Ones(H), qkv: P(H + 2 * kv * d, H), o: P(H, heads * d), postW: Ones(H), gate: P(E, H), w13: P(E, H, 2 * I), w2: P(E, I, H))).ToArray();
    var normW = Ones(H);
    var lmHead = P(V, H);
    using var inv = 1.0 / torch.pow(1e6, torch.arange(0, d, 2, dtype: float32, device: device) / d);
    using var ang = torch.outer(torch.arange(tokens, dtype: float32, device: device), inv);
    using var cos = torch.cat(new[] { ang, ang }, -1).cos().to(dt);
    using var sin = torch.cat(new[] { ang, ang }, -1).sin().to(dt);
    using var tokenIds = randint(0, V, new long[] { tokens }, device: device);
    Tensor Rope(Tensor x)
    {
        if (variant.ScriptRope) return cu.invoke<Tensor>("rope", x, cos, sin);
        var halves = x.chunk(2, -1);
        return x * cos + torch.cat(new[] { -halves[1], halves[0] }, -1) * sin;
    }
    Tensor Experts(Tensor xs, Tensor w13, Tensor w2, Tensor flat)
    {
        var cnt = torch.bincount(flat, minlength: E);
        if (strategy == "grouped") return cu.invoke<Tensor>("grouped", xs, w13, w2, cnt.cumsum(0).to(int32));
        return cu.invoke<Tensor>("looped", xs, w13, w2, cnt);
    }
    double flopsPerToken = 3 * (layers * (2 * (2.0 * H * H + 2.0 * H * kv * d) + 2 * 2.0 * tokens * H * 0.5 + K * 3 * 2.0 * H * I + 2.0 * H * E) + 2.0 * H * V);
    Time($"step, {layers} layers: {variant.Name}", flopsPerToken * tokens, () =>
    {
        using var _ = NewDisposeScope();
        var x = embed.index_select(0, tokenIds);
        var aux = new List<Tensor>();
        foreach (var l in L)
        {
            var h = cu.invoke<Tensor>("rmsnorm", x, l.inW, 1e-5);
            var qkv = nn.functional.linear(h, l.qkv).split(new long[] { heads * d, kv * d, kv * d }, -1);
            var q = Rope(qkv[0].view(1, tokens, heads, d).transpose(1, 2));
            var k = Rope(qkv[1].view(1, tokens, kv, d).transpose(1, 2));
            var v = qkv[2].view(1, tokens, kv, d).transpose(1, 2);
            var o = cu.invoke<Tensor>(variant.Attn, q, k, v).transpose(1, 2).reshape(tokens, heads * d);
            x = x + nn.functional.linear(o, l.o);
            h = cu.invoke<Tensor>("rmsnorm", x, l.postW, 1e-5);
            var probs = nn.functional.linear(h, l.gate).to(float32).softmax(-1);
            aux.Add(probs);
            var (topv, topi) = probs.topk(K, dim: -1);
            topv = topv / topv.sum(-1, keepdim: true);
            var flat = topi.flatten();
            var (_, order) = flat.sort(stable: true);
            var tokenIdx = order.div(K, rounding_mode: RoundingMode.floor);
            if (variant.Bmm)
            {
                var ysSorted = Experts(h.index_select(0, tokenIdx), l.w13, l.w2, flat);
                var inverse = order.argsort();
                x = x + cu.invoke<Tensor>("combine", ysSorted, inverse, topv.to(dt), (long)K);
            }
            else
            {
                var ys = Experts(h.index_select(0, tokenIdx), l.w13, l.w2, flat) * topv.flatten().index_select(0, order).unsqueeze(1).to(dt);
                x = x + torch.zeros_like(x).index_add(0, tokenIdx, ys, 1);
            }
        }
        var logits = nn.functional.linear(cu.invoke<Tensor>("rmsnorm", x, normW, 1e-5), lmHead);
        var loss = nn.functional.cross_entropy(variant.Bf16Ce ? logits[..^1] : logits[..^1].to(float32), tokenIds[1..]).to(float32);
        foreach (var pr in aux) loss = loss + 0.02 * pr.mean(new long[] { 0 }).pow(2).sum();
        loss.backward();
        foreach (var t in p) t.grad = null;
    });
    foreach (var t in p) t.Dispose();
}
