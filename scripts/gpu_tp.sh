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
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT/logs"
BUDGET="${PIE_GPU_BUDGET_S:-560}"
START=$SECONDS
export PIE_HOME="$(mktemp -d)" HF_HUB_OFFLINE=1 PIE_REQUIRE_FLASHINFER=1 PYTHONUNBUFFERED=1
# NVLink multicast stays off on these shared hosts (KINDS.md); the ranks inherit this environment
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STEPS="${*:-warm test run bench1 bench2 bench4 bench2nccl summary}"
NGPU=$(nvidia-smi --list-gpus | wc -l)

run() {  # run NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 left rc
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 20)); then echo "== $name: SKIPPED (${left}s left)" | tee -a "$OUT/summary.txt"; return; fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, $((SECONDS - START))s elapsed)"
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/logs/$name.log"
  echo "== $name: rc=$rc after $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
}
has() { [[ " $STEPS " == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" >/dev/null; then
  [ -d /tmp/site/flashinfer ] || pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:src:tests
else
  export PYTHONPATH=src:tests
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/logs/env.log"
nvidia-smi topo -m >> "$OUT/logs/env.log" 2>&1
echo "GPUs: $NGPU" | tee -a "$OUT/summary.txt"

# FlashInfer JIT for the per-rank head shapes (8B: 32/8 heads of 128 -> 16/4 at tp 2, 8/2 at tp 4; the tiny
# test's 8/2, 4/1, 2/1 of 64), in parallel, so the timed steps do not compile
warm() {
  python - "$@" <<'PY'
import sys, time
import torch
from pie.attention.base import AttentionMetadata
from pie.attention.flashinfer_backend import FlashInferBackend
from pie.drivers.protocol import make_batch
t0, dev, ps = time.time(), torch.device("cuda:0"), 16
hq, hkv, d = map(int, sys.argv[1:4])
be = FlashInferBackend(hq, hkv, d, ps, torch.bfloat16, dev)
kv = torch.randn(4, 2, ps, hkv, d, device=dev, dtype=torch.bfloat16)
reqs = [dict(token_ids=[0] * n, positions=list(range(n)), pages=[i], last_page_len=n) for i, n in enumerate((1, 5))]
for kind, rs in (("decode", [reqs[0]]), ("prefill", reqs)):
    b = make_batch(rs, ps)
    be.plan(AttentionMetadata.from_batch(b, ps, dev))
    be.run(torch.randn(b.num_tokens, hq, d, device=dev, dtype=torch.bfloat16), kv, 0)
torch.cuda.synchronize()
print(f"warm {' '.join(sys.argv[1:])}: {time.time() - t0:.1f}s", flush=True)
PY
}
export -f warm
if has warm; then
  run jit-warmup 300 bash -c 'warm 32 8 128 & warm 16 4 128 & warm 8 2 128 & warm 8 2 64 & warm 4 1 64 & warm 2 1 64 & wait'
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
