"""cuDNN attention with native grouped-query heads (what Moe calls on CUDA in bf16) against fp32 math
attention with expanded K/V: forward and q/k/v gradients, for Mixtral 8x7B's shape and small ones.
python3 attention_check.py"""
import torch

def math_attention(q, k, v):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q.shape[2]
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    return w @ v

def run(b, hq, hkv, s, d, lse):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda") for h in (hq, hkv, hkv))
    dout = torch.randn(b, hq, s, d, device="cuda")
    ref = []
    for t in (q, k, v): t.requires_grad_(True)
    out = math_attention(q, k, v); out.backward(dout)
    ref = [out.detach(), q.grad, k.grad, v.grad]
    qb, kb, vb = (t.detach().bfloat16().requires_grad_(True) for t in (q, k, v))
    o = torch._scaled_dot_product_cudnn_attention(qb, kb, vb, None, lse, 0.0, True, False)[0]
    o.backward(dout.bfloat16())
    got = [o.detach(), qb.grad, kb.grad, vb.grad]
    errs = [((g.float() - r).norm() / r.norm()).item() for g, r in zip(got, ref)]
    print(f"log_sumexp={lse} b={b} heads={hq}/{hkv} s={s} d={d}: relative error out {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}")

for shape in [(1, 32, 8, 4096, 128), (1, 48, 8, 4096, 128), (2, 4, 2, 32, 16), (2, 4, 2, 64, 16), (2, 4, 2, 32, 64),
              (2, 4, 4, 32, 16), (2, 8, 2, 128, 32), (1, 32, 8, 100, 128), (1, 32, 32, 32, 128)]:
    try:
        for lse in (True, False):
            run(*shape, lse)
    except Exception as e:
        print(shape, "failed:", str(e).splitlines()[0])
