#!/usr/bin/env bash
# The one command for the GPU machine: install the carried FlashInfer wheels, warm FlashInfer's JIT,
# run the GPU tests, the CPU suite's parity tests and `pie bench` (Qwen3-0.6B, Llama-3.2-1B, then
# Llama-3.1-8B if time is left). Logs, bench JSON and profiles go to $OUT (default: a temp dir).
#
# Usage (from the repository root):  bash scripts/gpu_check.sh
# Whole run stays under PIE_GPU_BUDGET_S seconds (default 530, under the 9-minute mark); a step that
# would start with too little time left is skipped and reported. Exit status: 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
BUDGET="${PIE_GPU_BUDGET_S:-530}"
START=$SECONDS
export PIE_HOME="$(mktemp -d)" HF_HUB_OFFLINE=1 PIE_REQUIRE_FLASHINFER=1 PYTHONUNBUFFERED=1
export PIE_PARITY_LOG="$OUT/parity.tsv"
FAILED=()

# run NAME LIMIT_S COMMAND...: under `timeout`, output teed into $OUT/NAME.log, rc recorded
run() {
  local name=$1 limit=$2 left rc
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 30)); then
    echo "== $name: SKIPPED, ${left}s left of the ${BUDGET}s budget" | tee -a "$OUT/summary.txt"
    FAILED+=("$name(skipped)")
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, $((SECONDS - START))s elapsed)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc after $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
  ((rc != 0)) && FAILED+=("$name")
}

# ---- environment -----------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  [ -d /tmp/site/flashinfer ] || pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
{
  nvidia-smi
  python -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.version.cuda, "transformers", transformers.__version__, "device", torch.cuda.get_device_name(0))'
  python -c 'import flashinfer; print("flashinfer", flashinfer.__version__)'
} 2>&1 | tee "$OUT/env.log"

# ---- FlashInfer JIT warm-up ---------------------------------------------------------------------------
# First compiles: ~100 s per prefill module (one per head_dim: it also serves masks and tensor-core
# decode), ~11 s per CUDA-core decode module. The independent modules build in parallel processes:
# head_dim 64 (tests, Llama-3.2-1B), head_dim 128 (Qwen3, Llama-3.1-8B), and mask packing.
warm() {
  python - "$@" <<'EOF'
import sys, time

import torch

from pie.attention.base import AttentionMetadata
from pie.attention.flashinfer_backend import FlashInferBackend
from pie.drivers.protocol import make_batch

t0, dev, ps = time.time(), torch.device("cuda:0"), 16
if sys.argv[1] == "packbits":
    import flashinfer

    flashinfer.segment_packbits(torch.ones(9, dtype=torch.bool, device=dev),
                                torch.tensor([0, 4, 9], dtype=torch.int32, device=dev), bitorder="little")
else:
    hq, hkv, d = map(int, sys.argv[1:4])
    be = FlashInferBackend(hq, hkv, d, ps, torch.bfloat16, dev)
    kv = torch.randn(4, 2, ps, hkv, d, device=dev, dtype=torch.bfloat16)
    reqs = [dict(token_ids=[0] * n, positions=list(range(n)), pages=[i], last_page_len=n) for i, n in enumerate((1, 5))]
    kinds = {"decode": [reqs[0]], "prefill": reqs, "masked": [{**r, "mask": [[True] * len(r["token_ids"])] * len(r["token_ids"])} for r in reqs]}
    for kind in sys.argv[4].split(","):
        b = make_batch(kinds[kind], ps)
        be.plan(AttentionMetadata.from_batch(b, ps, dev))
        be.run(torch.randn(b.num_tokens, hq, d, device=dev, dtype=torch.bfloat16), kv, 0)
torch.cuda.synchronize()
print(f"warm {' '.join(sys.argv[1:])}: {time.time() - t0:.1f}s", flush=True)
EOF
}
warm_all() {
  warm packbits &
  warm 16 8 128 decode,prefill &
  warm 4 2 64 decode,prefill,masked &
  local ok=0
  for job in $(jobs -p); do wait "$job" || ok=1; done
  warm 8 2 64 decode || ok=1  # tensor-core decode reuses the head_dim-64 prefill module
  return $ok
}
export -f warm warm_all
run jit-warmup 360 bash -c warm_all
# A job sharing the GPU (scripts/device_run.sh trains the embedded model during the warm-up) must end
# before anything is timed.
if [ -n "${PIE_WAIT_PID:-}" ]; then
  while kill -0 "$PIE_WAIT_PID" 2>/dev/null; do sleep 1; done
fi

# ---- tests and benchmarks ----------------------------------------------------------------------------
# `pie run` end to end on the GPU with the embedded model: cuda_native in-process, then dev as a subprocess
if [ -f src/pie/assets/default-model/model.safetensors ]; then
  for drv in cuda_native dev; do
    printf '[[model]]\nname = "default"\nhf_repo = "pie/embedded-default"\n[model.driver]\ntype = "%s"\ndevice = ["cuda:0"]\nactivation_dtype = "bfloat16"\n' \
      "$drv" > "$PIE_HOME/$drv.toml"
    run "pie-run-$drv" 120 python -m pie run -c "$PIE_HOME/$drv.toml" text-completion -- \
      --prompt "What does str.split do?" --max-tokens 48 --temperature 0
  done
fi
run gpu-tests 200 python -m pytest tests/test_gpu.py tests/test_kernels.py tests/test_cuda_graphs.py -q -rs -p no:cacheprovider
for model in qwen3-0.6b llama-3.2-1b; do
  run "bench-$model" 120 bash -c "python -m pie bench --model-config $model --random-weights --json \
    --profile '$OUT/profile-$model.txt' > '$OUT/bench-$model.json'"
done
run cpu-parity 150 python -m pytest tests/test_parity_hf.py tests/test_flashinfer_plan.py tests/test_bench_cpu.py \
  -q -p no:cacheprovider
run bench-llama-3.1-8b 120 bash -c "python -m pie bench --model-config llama-3.1-8b --random-weights --json \
  > '$OUT/bench-llama-3.1-8b.json'"

# the same decode steps eagerly (no CUDA graphs), for comparison on the same machine
for model in qwen3-0.6b llama-3.2-1b; do
  run "bench-$model-eager" 90 bash -c "python -m pie bench --model-config $model --random-weights --no-cuda-graphs \
    --prefill none --json > '$OUT/bench-$model-eager.json'"
done

echo "== total $((SECONDS - START))s; logs and JSON in $OUT" | tee -a "$OUT/summary.txt"
if ((${#FAILED[@]})); then
  echo "FAILED: ${FAILED[*]}" | tee -a "$OUT/summary.txt"
  exit 1
fi
echo "ALL PASSED" | tee -a "$OUT/summary.txt"
