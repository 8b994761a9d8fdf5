#!/usr/bin/env bash
# GPU run for tensor parallelism (issue 9): the bf16 tp 2 / tp 4 vs tp 1 test (NCCL, FlashInfer, CUDA-graph
# decode), a pie run through cuda_native at tp 2, and `pie bench` on Llama-3.1-8B-shaped random weights at tp 1,
# 2 and 4 (as many as the GPUs allow): decode batch 1 and 64 and a 4 x 2048 prefill, with the collectives of
# each step timed alone (graph-captured all-reduces and all-gather). Ends with the speedup table; the goal is
# tp 2 batch-1 decode >= 1.6x faster than tp 1. Logs and bench JSON go to $OUT.
#
# Usage (repository root, on a machine with 2 or more GPUs):  bash scripts/gpu_tp.sh [STEP ...]
# Steps: warm test run bench1 bench2 bench4 bench2nccl summary (default: all). Small all-reduces use
# symmetric memory (one-shot, peer to peer) unless PIE_TP_ALLREDUCE=nccl; bench2nccl is tp 2 with NCCL only.
# The whole run stays under PIE_GPU_BUDGET_S seconds (default 560).
source "$(dirname "$0")/gpu_lib.sh"
# NVLink multicast stays off on these shared hosts (KINDS.md); the ranks inherit this environment
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STEPS="${*:-warm test run bench1 bench2 bench4 bench2nccl summary}"
NGPU=$(nvidia-smi --list-gpus | wc -l)

use_wheels tests
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$LOGS/env.log"
nvidia-smi topo -m >> "$LOGS/env.log" 2>&1
echo "GPUs: $NGPU" | tee -a "$OUT/summary.txt"

# FlashInfer JIT for the per-rank head shapes (8B: 32/8 heads of 128 -> 16/4 at tp 2, 8/2 at tp 4; the tiny
# test's 8/2, 4/1, 2/1 of 64), in parallel, so the timed steps do not compile
if has warm; then
  run jit-warmup 300 bash -c 'for s in "32 8 128" "16 4 128" "8 2 128" "8 2 64" "4 1 64" "2 1 64"; do warm $s decode,prefill & done; wait'
fi

has test && run gpu-tp-test 240 python -m pytest tests/test_gpu_tp.py -q -rs -s -x -p no:cacheprovider

if has run && ((NGPU >= 2)); then  # the whole stack: cuda_native at tp 2, the embedded model (6 heads, 2 KV heads)
  printf '[[model]]\nname = "default"\nhf_repo = "pie/embedded-default"\n[model.driver]\ntype = "cuda_native"\ndevice = ["cuda:0", "cuda:1"]\ntensor_parallel_size = 2\nactivation_dtype = "bfloat16"\n' > "$PIE_HOME/tp2.toml"
  run pie-run-tp2 120 python -m pie run -v -c "$PIE_HOME/tp2.toml" text-completion -- --prompt "What does str.split do?" --max-tokens 48 --temperature 0
fi

for tp in 1 2 4; do
  has "bench$tp" || continue
  if ((NGPU < tp)); then echo "== bench$tp: SKIPPED ($NGPU GPUs)" | tee -a "$OUT/summary.txt"; continue; fi
  run "bench-8b-tp$tp" 170 bash -c "python -m pie bench --model-config llama-3.1-8b --random-weights --tp $tp --batch-sizes 1,64 --prefill 4x2048 --json > '$OUT/bench_8b_tp$tp.json'"
done
if has bench2nccl && ((NGPU >= 2)); then
  run bench-8b-tp2-nccl 170 env PIE_TP_ALLREDUCE=nccl bash -c "python -m pie bench --model-config llama-3.1-8b --random-weights --tp 2 --batch-sizes 1,64 --prefill 4x2048 --json > '$OUT/bench_8b_tp2_nccl.json'"
fi

if has summary; then
  python - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for tp in (1, 2, 4, "2_nccl"):
    p = out / f"bench_8b_tp{tp}.json"
    try:
        rows[tp] = json.loads(p.read_text())
    except (OSError, ValueError):
        continue
if 1 not in rows:
    sys.exit("no tp 1 bench record: no speedups to report")
def figs(rec):
    return {f["name"]: f for f in rec["figures"]}
base = figs(rows[1])
print(f"{'tp':>6} {'b1 ms/tok':>10} {'x tp1':>6} {'b64 tok/s':>10} {'x tp1':>6} {'prefill tok/s':>14} {'x tp1':>6}  collectives ms (b1 / b64 / prefill)")
for tp, rec in rows.items():
    f = figs(rec)
    b1, b64, pre = f["decode_ms_per_token"], f["decode_tokens_per_s_b64"], f["prefill_tokens_per_s"]
    coll = (rec.get("tensor_parallel") or {}).get("collective_s", {})
    c = " / ".join(f"{coll[k] * 1e3:.3f}" if k in coll else "-" for k in ("decode_b1", "decode_b64", "prefill"))
    print(f"{tp!s:>6} {b1['value']:>10.3f} {base['decode_ms_per_token']['value'] / b1['value']:>6.2f} "
          f"{b64['value']:>10.0f} {b64['value'] / base['decode_tokens_per_s_b64']['value']:>6.2f} "
          f"{pre['value']:>14.0f} {pre['value'] / base['prefill_tokens_per_s']['value']:>6.2f}  {c}")
if 2 in rows:
    speedup = base["decode_ms_per_token"]["value"] / figs(rows[2])["decode_ms_per_token"]["value"]
    print(f"goal tp 2 batch-1 decode >= 1.6x tp 1: {speedup:.2f}x -> {'MET' if speedup >= 1.6 else 'NOT MET'}")
PY
fi
echo "== total $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$OUT/logs"
