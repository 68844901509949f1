# The transformers baseline's model and step (../shared/bench/hf_mixtral_baseline.py, same config), with the caching
# allocator's peaks per phase, as `moe bench --allocator-stats` reports ours: peak allocated in the forward, allocated
# when it returns, peak allocated in the whole step, peak reserved, and device memory in use. One JSON line.
import argparse, json, sys, torch
sys.path.insert(0, ".gpu")
from hf_mixtral_baseline import DIMS
from transformers import MixtralConfig, MixtralForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", default="8x7b", choices=DIMS)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--seq", type=int, default=4096)
a = p.parse_args()
d = DIMS[a.model]
cfg = MixtralConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["ffn"], num_hidden_layers=a.layers,
                    num_attention_heads=d["heads"], num_key_value_heads=d["kv"], num_local_experts=d["experts"],
                    num_experts_per_tok=d["topk"], max_position_embeddings=a.seq, rope_theta=1e6, output_router_logits=True,
                    router_aux_loss_coef=0.02, tie_word_embeddings=False)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
with torch.device("cuda"):
    model = MixtralForCausalLM(cfg).to(torch.bfloat16)
model.train()
ids = torch.randint(0, d["vocab"], (1, a.seq), device="cuda")
G = 2**30
for i in range(4):
    torch.cuda.reset_peak_memory_stats()
    loss = model(input_ids=ids, labels=ids).loss
    fwd_peak, after_fwd = torch.cuda.max_memory_allocated() / G, torch.cuda.memory_allocated() / G
    loss.backward()
    model.zero_grad(set_to_none=True)
    del loss
torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info()
print(json.dumps(dict(system="hf-transformers", model=a.model, layers=a.layers, seq=a.seq, alloc_forward_peak_gb=fwd_peak,
                      alloc_after_forward_gb=after_fwd, alloc_peak_gb=torch.cuda.max_memory_allocated() / G,
                      reserved_peak_gb=torch.cuda.max_memory_reserved() / G, max_mem_gb=(total - free) / G)))
