#!/usr/bin/env bash
# GPU run for the runtime (issue 5) and the model roster: FlashInfer JIT warm-up, the GPU tests, and
# `pie bench --e2e` (N inferlets generating through the runtime and SDK beside the executor-only figure),
# plus the runtime's host cost against a no-op driver. Logs and bench JSON go to $OUT.
#
# Usage (repository root, on the GPU machine):  bash scripts/gpu_runtime.sh [STEP ...]
# Steps: warm tests families moe bench-qwen3 bench-llama1b bench-8b noop run   (default: all but families/moe)
# The whole run stays under PIE_GPU_BUDGET_S seconds (default 560).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT/logs"
BUDGET="${PIE_GPU_BUDGET_S:-560}"
START=$SECONDS
export PIE_HOME="$(mktemp -d)" HF_HUB_OFFLINE=1 PIE_REQUIRE_FLASHINFER=1 PYTHONUNBUFFERED=1
export PIE_PARITY_LOG="$OUT/logs/parity.tsv"
STEPS="${*:-warm tests bench-qwen3 bench-llama1b noop run}"

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
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/logs/env.log"

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
kinds = {"decode": [reqs[0]], "prefill": reqs}
for kind in sys.argv[4].split(","):
    b = make_batch(kinds[kind], ps)
    be.plan(AttentionMetadata.from_batch(b, ps, dev))
    be.run(torch.randn(b.num_tokens, hq, d, device=dev, dtype=torch.bfloat16), kv, 0)
torch.cuda.synchronize()
print(f"warm {' '.join(sys.argv[1:])}: {time.time() - t0:.1f}s", flush=True)
PY
}
export -f warm
if has warm; then
  run jit-warmup 300 bash -c 'warm 16 8 128 decode,prefill & warm 4 2 64 decode,prefill & warm 32 8 64 decode & wait'
fi
has run && for drv in cuda_native dev; do
  printf '[[model]]\nname = "default"\nhf_repo = "pie/embedded-default"\n[model.driver]\ntype = "%s"\ndevice = ["cuda:0"]\nactivation_dtype = "bfloat16"\n' "$drv" > "$PIE_HOME/$drv.toml"
  run "pie-run-$drv" 90 python -m pie run -v -c "$PIE_HOME/$drv.toml" text-completion -- --prompt "What does str.split do?" --max-tokens 48 --temperature 0
done
has tests && run gpu-tests 240 python -m pytest tests/test_gpu.py tests/test_cuda_graphs.py tests/test_page_ops_gpu.py tests/test_kernels.py -q -rs -x -p no:cacheprovider
has families && run gpu-families 240 python -m pytest tests/test_gpu_families.py tests/test_gpu_gemma4.py -q -rs -p no:cacheprovider
has moe && run gpu-moe 200 python -m pytest tests/test_moe_gpu.py tests/test_gpt_oss.py -m gpu -q -rs -p no:cacheprovider
has noop && run noop-host-cost 60 python -m pie bench --noop-driver --e2e-steps 300 --json
for m in qwen3-0.6b:bench-qwen3 llama-3.2-1b:bench-llama1b llama-3.1-8b:bench-8b; do
  model=${m%%:*}; step=${m##*:}
  has "$step" && run "$step" 150 bash -c "python -m pie bench --model-config $model --random-weights --prefill none --e2e --e2e-steps 64 --json > '$OUT/$step.json'"
done
echo "== total $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$OUT/logs"
