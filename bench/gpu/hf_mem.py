# Runs the transformers baseline, then prints its memory the way `moe bench` measures ours:
# device memory in use (cudaMemGetInfo: total - free, context included), plus the allocator's peaks.
import json, runpy, sys, torch
sys.argv = [".gpu/hf_mixtral_baseline.py"] + sys.argv[1:]
runpy.run_path(".gpu/hf_mixtral_baseline.py", run_name="__main__")
free, total = torch.cuda.mem_get_info()
print(json.dumps({"hf_in_use_gb": (total - free) / 2**30, "hf_max_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
                  "hf_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}))
