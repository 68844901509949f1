#!/usr/bin/env python3
"""Megatron-Core's own MoE layer as the oracle for Moe's MixtureOfExperts (issue 12, item 5).

Runs Megatron-Core 0.20 (Megatron-LM commit d98e8a64ddf34856e74b24714e3bedb2f5a39553, the version
shared/spec/megatron-rules.md follows) on fixed weights and inputs, in float32, forward and backward, and
writes one fixture file per case for tests/Moe.Runtime.Tests/MegatronMoeOracleTests.cs.

Run it on the GPU host, from the repository root, with one GPU:

    MEGATRON_PATH=/path/to/Megatron-LM \
    torchrun --standalone --nproc_per_node 1 bench/gpu/megatron_moe_oracle.py --out tests/fixtures/megatron-moe

MEGATRON_PATH is the root of a Megatron-LM checkout (the folder holding megatron/), or of a `git archive` of one
with MEGATRON_COMMIT set to its commit (`git get-tar-commit-id < archive.tar`); only megatron/core
is imported, no Transformer Engine, no Apex. It prints one line per case and exits non-zero if any case
fails; files are written under temporary names and renamed only when complete, and nothing is left
behind for a failed case.

The layer is built the way Megatron builds it for a GPT model: TransformerConfig +
get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False, normalization="RMSNorm").submodules.mlp
(MoELayer with TopKRouter, the all-to-all dispatcher and SequentialMLP experts), expert parallel 1.

Layout of a case file <case>.safetensors (all float32 unless said):
  gate.weight [E, H], experts.{e}.w1.weight [F, H], experts.{e}.w3.weight [F, H], experts.{e}.w2.weight [H, F]
      the weights, in Hugging Face Mixtral naming (Megatron's fc1 is [w1; w3] stacked, fc2 is w2)
  expert_bias [E]                   (cases with the expert bias) the bias the forward used
  for each micro-batch m = 0 .. M-1 (M = 1, except global_aux_loss: 2):
    input.{m} [S, B, H]             Megatron's layout: token (b, s) is row s, column b
    upstream_grad.{m} [S, B, H]     dL/d output fed to backward
    output.{m} [S, B, H]            the MoE layer's output
    input_grad.{m} [S, B, H]
    router_logits.{m} [S*B, E]      rows in Megatron's token order s*B + b (router dtype: F64 for fp64)
    routing_probs.{m} [S*B, E]      the router's final probs (after capacity), dense (router dtype)
    routing_map.{m} [S*B, E]        I64 0/1, the router's final routing map (after capacity, with padding)
    tokens_per_expert.{m} [E]       I64, rows each expert computed (what the dispatcher gave SequentialMLP)
    aux_loss.{m} []                 raw load-balancing loss (tracker value = loss / coefficient), if any
    z_loss.{m} []                   raw z-loss (tracker value = loss / coefficient), if any
  grad.gate.weight, grad.experts.{e}.w1.weight, ... accumulated over the M micro-batches
  expert_bias_counts [E], expert_bias_updated [E]
      (bias cases) the router's local_tokens_per_expert after the step and Megatron's
      get_updated_expert_bias(counts, bias, rate) applied to them
cases.json: each case's exact TransformerConfig arguments, sizes, coefficients, micro-batches, and the
Megatron commit, torch version and GPU that produced it.

Losses: the backward includes the aux and z losses through MoEAuxLossAutoScaler with its scale set to 1,
i.e. the gradient of  sum(output * upstream_grad) + aux_coeff * aux_raw + z_coeff * z_raw  per micro-batch.
The raw values are what Megatron's MoE metrics tracker records for the layer (loss / coefficient; one
layer, num_layers = 1, tensor x context parallel 1, so no other scaling applies).
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import traceback

EXPECTED_COMMIT = "d98e8a64ddf34856e74b24714e3bedb2f5a39553"

# Sizes: small enough that every case file is well under 100 KB (the fixture folder stays under 1 MB).
S, B, H, F, E, K = 16, 2, 16, 24, 8, 2
SEED = 1234
# Selection margins below this make the CPU/GPU comparison hinge on rounding: refuse such a case.
MIN_MARGIN = 1e-4

BASE = dict(
    num_layers=1,
    hidden_size=H,
    ffn_hidden_size=F,
    moe_ffn_hidden_size=F,
    num_attention_heads=4,
    num_moe_experts=E,
    moe_router_topk=K,
    normalization="RMSNorm",
    gated_linear_unit=True,
    add_bias_linear=False,
    bias_activation_fusion=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    moe_grouped_gemm=False,
    moe_token_dispatcher_type="alltoall",
    moe_permute_fusion=False,
    moe_router_fusion=False,
    moe_router_load_balancing_type="none",
    moe_aux_loss_coeff=0.0,
    moe_z_loss_coeff=None,
    tensor_model_parallel_size=1,
    expert_model_parallel_size=1,
    sequence_parallel=False,
    bf16=False,
    fp16=False,
)

# name -> (TransformerConfig overrides, micro-batches, checks)
CASES = {
    "dropless": (dict(), 1, ()),
    "capacity_probs": (dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs",
                            moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2), 1, ("drops",)),
    "capacity_position": (dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="position"), 1, ("drops",)),
    "pad_to_capacity": (dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs",
                             moe_pad_expert_input_to_capacity=True), 1, ("drops", "padded")),
    "sigmoid_expert_bias": (dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                 moe_router_bias_update_rate=1e-3, moe_router_load_balancing_type="aux_loss",
                                 moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3), 1, ("bias_changes_choice",)),
    "group_limited": (dict(moe_router_num_groups=2, moe_router_group_topk=1), 1, ("groups_change_choice",)),
    "group_limited_sigmoid_bias": (dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                        moe_router_num_groups=4, moe_router_group_topk=2, moe_router_bias_update_rate=1e-3,
                                        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-3),
                                   1, ("groups_change_choice",)),
    "router_fp64_pre_softmax": (dict(moe_router_dtype="fp64", moe_router_pre_softmax=True,
                                     moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
                                     moe_z_loss_coeff=1e-3), 1, ()),
    "aux_loss": (dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3), 1, ()),
    "seq_aux_loss": (dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2), 1, ()),
    "global_aux_loss": (dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=1e-2), 2, ()),
}

TRACKER_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                 "global_aux_loss": "global_load_balancing_loss"}


def fail(message):
    print(f"megatron_moe_oracle: {message}", file=sys.stderr)
    sys.exit(2)


def import_megatron():
    root = os.environ.get("MEGATRON_PATH")
    if not root:
        fail("MEGATRON_PATH is not set: point it at the root of a Megatron-LM checkout "
             f"(commit {EXPECTED_COMMIT}, the folder that holds megatron/core).")
    if not os.path.isfile(os.path.join(root, "megatron", "core", "package_info.py")):
        fail(f"MEGATRON_PATH={root} has no megatron/core/package_info.py; it must be the Megatron-LM root.")
    sys.path.insert(0, root)
    commit = None
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    # An exported tree (git archive) has no .git: its commit is the archive's commit id (git get-tar-commit-id),
    # passed as MEGATRON_COMMIT.
    commit = commit or os.environ.get("MEGATRON_COMMIT") or None
    from megatron.core import package_info
    return root, commit, package_info.__version__


def check_environment(args):
    import torch
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        fail("run under torchrun (Megatron needs torch.distributed even on one GPU): "
             "torchrun --standalone --nproc_per_node 1 bench/gpu/megatron_moe_oracle.py --out DIR")
    if int(os.environ["WORLD_SIZE"]) != 1:
        fail(f"use one process (--nproc_per_node 1); WORLD_SIZE is {os.environ['WORLD_SIZE']}.")
    if not torch.cuda.is_available():
        fail("no CUDA device: Megatron-Core's router and dispatcher allocate on the current CUDA device.")
    os.makedirs(args.out, exist_ok=True)


def write_safetensors(path, tensors, metadata):
    """Writes a safetensors file (header length, JSON header, raw little-endian data) atomically."""
    import torch
    names = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in names:
            raise TypeError(f"{name}: dtype {t.dtype} is not written")
        data = t.numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * ((8 - len(head) % 8) % 8)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for b in blobs:
                f.write(b)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_layer(overrides):
    import torch
    import torch.nn.functional as Fn
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(BASE, **overrides)
    config = TransformerConfig(activation_func=Fn.silu, params_dtype=torch.float32, **kwargs)
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False, normalization="RMSNorm").submodules.mlp
    layer = build_module(spec, config=config) if isinstance(spec, ModuleSpec) else spec(config=config)
    layer.set_layer_number(1)
    return layer.cuda(), kwargs


def seeded_weights():
    """Weights and inputs from one seeded CPU generator, identical for every case."""
    import torch
    g = torch.Generator().manual_seed(SEED)
    w = {"gate.weight": torch.randn(E, H, generator=g) * 0.5}   # logits of std ~2: uneven routing, drops at factor 1
    for e in range(E):
        w[f"experts.{e}.w1.weight"] = torch.randn(F, H, generator=g) / H ** 0.5
        w[f"experts.{e}.w3.weight"] = torch.randn(F, H, generator=g) / H ** 0.5
        w[f"experts.{e}.w2.weight"] = torch.randn(H, F, generator=g) / F ** 0.5
    bias = torch.randn(E, generator=g) * 0.1
    inputs = [torch.randn(S, B, H, generator=g) for _ in range(2)]
    upstream = [torch.randn(S, B, H, generator=g) for _ in range(2)]
    return w, bias, inputs, upstream


def load_weights(layer, w):
    import torch
    with torch.no_grad():
        layer.router.weight.copy_(w["gate.weight"])
        for e, expert in enumerate(layer.experts.local_experts):
            expert.linear_fc1.weight.copy_(torch.cat([w[f"experts.{e}.w1.weight"], w[f"experts.{e}.w3.weight"]]))
            expert.linear_fc2.weight.copy_(w[f"experts.{e}.w2.weight"])


def weight_grads(layer):
    import torch
    g = {"grad.gate.weight": layer.router.weight.grad}
    for e, expert in enumerate(layer.experts.local_experts):
        fc1 = expert.linear_fc1.weight.grad if expert.linear_fc1.weight.grad is not None else torch.zeros_like(expert.linear_fc1.weight)
        fc2 = expert.linear_fc2.weight.grad if expert.linear_fc2.weight.grad is not None else torch.zeros_like(expert.linear_fc2.weight)
        g[f"grad.experts.{e}.w1.weight"] = fc1[:F]
        g[f"grad.experts.{e}.w3.weight"] = fc1[F:]
        g[f"grad.experts.{e}.w2.weight"] = fc2
    if g["grad.gate.weight"] is None:
        raise RuntimeError("the router weight got no gradient")
    return g


def selection_scores(logits, cfg, bias):
    """What Megatron's top-k ranks (topk_routing_with_score_function), for the margin checks."""
    import torch
    if cfg.get("moe_router_score_function", "softmax") == "sigmoid":
        s = torch.sigmoid(logits.float())
        return s + bias.float() if bias is not None else s
    if cfg.get("moe_router_pre_softmax", False):
        return torch.softmax(logits, dim=-1, dtype=torch.float32)
    return logits


def check_margins(name, sel, cfg, probs):
    import torch
    groups, group_topk = cfg.get("moe_router_num_groups"), cfg.get("moe_router_group_topk")
    sel = sel.double()
    if group_topk:
        per = E // groups
        gscores = sel.view(-1, groups, per).topk(K // group_topk, dim=-1).values.sum(-1)
        top = gscores.topk(group_topk + 1, dim=-1).values if group_topk < groups else None
        if top is not None and (top[:, group_topk - 1] - top[:, group_topk]).min().item() < MIN_MARGIN:
            raise RuntimeError(f"{name}: two expert groups score within {MIN_MARGIN}; change SEED")
        mask = torch.zeros_like(gscores).scatter(1, gscores.topk(group_topk, dim=-1).indices, 1)
        sel = sel.masked_fill(~mask.bool().repeat_interleave(per, dim=1), float("-inf"))
    top = sel.topk(K + 1, dim=-1).values
    finite = torch.isfinite(top[:, K])
    gap = (top[:, K - 1] - top[:, K])[finite]
    if gap.numel() and gap.min().item() < MIN_MARGIN:
        raise RuntimeError(f"{name}: a token's K-th and (K+1)-th experts score within {MIN_MARGIN}; change SEED")
    if probs is not None and cfg.get("moe_token_drop_policy") == "probs":
        # probs policy: the capacity-th and next-largest probabilities of an expert must be distinct.
        cap = -(-S * B * K * cfg["moe_expert_capacity_factor"] // E)
        col = probs.double().topk(int(min(cap + 1, S * B)), dim=0).values
        if cap < S * B and ((col[int(cap) - 1] - col[int(cap)]) < MIN_MARGIN).logical_and(col[int(cap)] > 0).any():
            raise RuntimeError(f"{name}: the capacity cut falls between near-equal probabilities; change SEED")


def run_case(name, overrides, microbatches, checks, w, bias0, inputs, upstream):
    import torch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe import moe_logging
    from megatron.core.transformer.moe import router as router_module
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_updated_expert_bias

    model_parallel_cuda_manual_seed(SEED)
    layer, cfg = build_layer(overrides)
    layer.train()
    load_weights(layer, w)
    with_bias = cfg.get("moe_router_enable_expert_bias", False)
    if with_bias:
        with torch.no_grad():
            layer.router.expert_bias.copy_(bias0)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device="cuda"))

    captured = {}
    gating = layer.router.gating
    layer.router.gating = lambda inp: captured.setdefault("logits", gating(inp))
    layer.router.register_forward_hook(lambda m, a, out: captured.__setitem__("routing", out))
    layer.experts.register_forward_pre_hook(lambda m, a: captured.__setitem__("tokens_per_expert", a[1]))
    # Record what the router attaches to the backward, and its probs before capacity, by wrapping the two
    # functions router.py calls (restored in the finally below).
    scaled = []
    own_apply = MoEAuxLossAutoScaler.__dict__.get("apply")
    original_apply = MoEAuxLossAutoScaler.apply
    MoEAuxLossAutoScaler.apply = staticmethod(lambda act, loss: (scaled.append(float(loss.detach())), original_apply(act, loss))[1])
    original_drop = router_module.apply_router_token_dropping

    def dropping(probs, routing_map, **kw):
        captured["probs_before_capacity"] = probs.detach()
        return original_drop(probs, routing_map, **kw)

    router_module.apply_router_token_dropping = dropping

    out = {}
    lb = cfg["moe_router_load_balancing_type"]
    try:
        for m in range(microbatches):
            captured.clear()
            scaled.clear()
            moe_logging.set_moe_metrics_tracker(moe_logging.MoEMetricsTracker())
            x = inputs[m].cuda().requires_grad_(True)
            y, mlp_bias = layer(x)
            if mlp_bias is not None:
                raise RuntimeError("the MoE layer returned a bias; add_bias_linear must be off")
            torch.autograd.backward(y, upstream[m].cuda())
            probs, routing_map = captured["routing"]
            tpe = captured["tokens_per_expert"]
            out[f"input.{m}"] = inputs[m]
            out[f"upstream_grad.{m}"] = upstream[m]
            out[f"output.{m}"] = y.detach().float()
            out[f"input_grad.{m}"] = x.grad.float()
            out[f"router_logits.{m}"] = captured["logits"].detach().reshape(S * B, E)
            out[f"routing_probs.{m}"] = probs.detach().reshape(S * B, E)
            out[f"routing_map.{m}"] = routing_map.detach().reshape(S * B, E).long()
            out[f"tokens_per_expert.{m}"] = torch.as_tensor(tpe).detach().long().reshape(E)
            metrics = moe_logging.get_moe_metrics_tracker().metrics
            raw = []
            if lb != "none":
                v = metrics[TRACKER_NAMES[lb]].values[0]
                out[f"aux_loss.{m}"] = v.detach().float().reshape(())
                raw.append(float(v) * cfg["moe_aux_loss_coeff"])
            if cfg.get("moe_z_loss_coeff") is not None:
                v = metrics["z_loss"].values[0]
                out[f"z_loss.{m}"] = v.detach().float().reshape(())
                raw.append(float(v) * cfg["moe_z_loss_coeff"])
            # The tracker's raw value times the coefficient must be what went into the backward.
            if len(raw) != len(scaled) or any(abs(a - b) > 1e-5 * max(abs(a), abs(b)) for a, b in zip(sorted(raw), sorted(scaled))):
                raise RuntimeError(f"tracked losses {raw} (times coefficients) differ from those attached to the backward {scaled}")
            if "probs_before_capacity" in captured:
                out[f"routing_probs_before_capacity.{m}"] = captured["probs_before_capacity"].reshape(S * B, E)
            sel = selection_scores(captured["logits"].detach().reshape(S * B, E), cfg, bias0.cuda() if with_bias else None)
            check_margins(name, sel, cfg, captured.get("probs_before_capacity"))
    finally:
        if own_apply is None:
            del MoEAuxLossAutoScaler.apply   # back to torch.autograd.Function.apply
        else:
            MoEAuxLossAutoScaler.apply = own_apply
        router_module.apply_router_token_dropping = original_drop

    tpe0 = out["tokens_per_expert.0"]
    cap = -(-S * B * K // E)   # capacity at factor 1.0: ceil(T·K/E)
    if "drops" in checks and not bool(((out["routing_probs_before_capacity.0"] > 0).sum(0) > cap).any()):
        raise RuntimeError(f"{name}: no expert got more than its capacity {cap}; change SEED")
    if "padded" in checks:
        if not bool((tpe0 == cap).all()):
            raise RuntimeError(f"{name}: pad-to-capacity gave {tpe0.tolist()} rows, not {cap} per expert")
        if out["routing_map.0"].sum().item() != cap * E:
            raise RuntimeError(f"{name}: padded routing map has {out['routing_map.0'].sum().item()} entries")
    if "groups_change_choice" in checks or "bias_changes_choice" in checks:
        plain = selection_scores(out["router_logits.0"].cuda(), {k: v for k, v in cfg.items() if k != "moe_router_num_groups"}, None)
        plain_map = torch.zeros_like(plain, dtype=torch.bool).scatter(1, plain.topk(K, dim=-1).indices, True)
        if bool((plain_map.cpu() == out["routing_map.0"].bool().cpu()).all()):
            raise RuntimeError(f"{name}: group limits / expert bias changed no token's experts; change SEED")

    out.update({k: v.float() for k, v in weight_grads(layer).items()})
    out.update(w)
    if with_bias:
        out["expert_bias"] = bias0
        counts = layer.router.local_tokens_per_expert.detach().clone()
        out["expert_bias_counts"] = counts.float()
        out["expert_bias_updated"] = get_updated_expert_bias(
            counts.clone(), layer.router.expert_bias.detach().clone(), cfg["moe_router_bias_update_rate"]).float()
    return out, cfg, scaled


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for <case>.safetensors and cases.json")
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="subset of: " + ", ".join(CASES))
    parser.add_argument("--allow-other-commit", action="store_true", help="run on a Megatron-LM other than " + EXPECTED_COMMIT)
    args = parser.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        fail(f"unknown case(s) {unknown}; known: {list(CASES)}")

    root, commit, version = import_megatron()
    if commit != EXPECTED_COMMIT and not args.allow_other_commit:
        fail(f"MEGATRON_PATH={root} is at commit {commit or '(not a git checkout)'}, not {EXPECTED_COMMIT} "
             "(Megatron-Core 0.20, what the spec follows); check it out or pass --allow-other-commit.")
    check_environment(args)

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    torch.backends.cuda.matmul.allow_tf32 = False   # float32 means float32: no TF32 in the matmuls
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                             expert_model_parallel_size=1)

    w, bias0, inputs, upstream = seeded_weights()
    manifest_path = os.path.join(args.out, "cases.json")
    manifest = {}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f).get("cases", {})
    failures = 0
    for name in args.cases:
        overrides, microbatches, checks = CASES[name]
        try:
            tensors, cfg, scaled = run_case(name, overrides, microbatches, checks, w, bias0, inputs, upstream)
            meta = {"case": name, "megatron_commit": commit or "unknown", "megatron_version": version}
            write_safetensors(os.path.join(args.out, name + ".safetensors"), tensors, meta)
            manifest[name] = {
                "config": {k: v for k, v in sorted(cfg.items())},
                "activation_func": "silu", "params_dtype": "float32",
                "sizes": {"S": S, "B": B, "H": H, "F": F, "E": E, "K": K},
                "microbatches": microbatches, "seed": SEED,
                "losses_attached_to_backward": scaled,
            }
            tpe = tensors["tokens_per_expert.0"].tolist()
            losses = " ".join(f"{k.split('.')[0]}={float(tensors[k]):.6g}" for k in sorted(tensors) if k.split(".")[0] in ("aux_loss", "z_loss") and k.endswith(".0"))
            print(f"ok   {name:28s} tokens/expert {tpe} {losses}", flush=True)
        except Exception:   # report every case, then fail the run
            failures += 1
            print(f"FAIL {name}", flush=True)
            traceback.print_exc()
            stale = os.path.join(args.out, name + ".safetensors")
            if os.path.exists(stale):
                os.remove(stale)   # never leave an old file beside a failed run's manifest
            manifest.pop(name, None)
    with open(manifest_path + ".tmp", "w") as f:
        json.dump({
            "megatron_commit": commit or "unknown", "megatron_version": version,
            "torch": torch.__version__, "device": torch.cuda.get_device_name(),
            "layout": "inputs/outputs [S, B, H] (Megatron); token (b, s) is row s*B + b of router_logits/routing_*",
            "cases": manifest,
        }, f, indent=1, sort_keys=True)
    os.replace(manifest_path + ".tmp", manifest_path)
    dist.destroy_process_group()
    if failures:
        print(f"{failures} case(s) failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
