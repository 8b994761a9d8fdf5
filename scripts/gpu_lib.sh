# shellcheck shell=bash
# The preamble the GPU run scripts share (gpu_check.sh, gpu_runtime.sh, gpu_tp.sh): source it, do not run it.
# It moves to the repository root and sets OUT (default: a temp dir), LOGS (where each step's log goes),
# BUDGET (PIE_GPU_BUDGET_S, else GPU_BUDGET_DEFAULT, else 560 s), START and FAILED, and defines
#   run NAME LIMIT_S COMMAND...   a step under `timeout`, cut to the budget left; log in $LOGS/NAME.log,
#                                 rc in $OUT/summary.txt, failed or skipped steps appended to FAILED
#   has STEP                      whether STEP is among $STEPS (the steps the caller was asked for)
#   use_wheels [EXTRA_PATH]       PYTHONPATH=src[:EXTRA_PATH], the carried FlashInfer wheels (.whl/) first
#   warm HQ HKV D KINDS | warm packbits   compile FlashInfer's JIT modules for one head shape (exported)
# Set before sourcing (all optional): GPU_BUDGET_DEFAULT; GPU_LOG_DIR (under $OUT, default "logs");
# GPU_RUN_MIN_LEFT (a step starting with less left is skipped, default 20 s); GPU_RUN_KILL_AFTER (SIGKILL
# this long after the SIGINT, default 10 s); GPU_RUN_STREAM=1 to tee a step's whole output live instead of
# printing its last 25 lines when it ends.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$(mktemp -d)}"
LOGS="$OUT/${GPU_LOG_DIR:-logs}"
mkdir -p "$LOGS"
BUDGET="${PIE_GPU_BUDGET_S:-${GPU_BUDGET_DEFAULT:-560}}"
START=$SECONDS
export PIE_HOME="$(mktemp -d)" HF_HUB_OFFLINE=1 PIE_REQUIRE_FLASHINFER=1 PYTHONUNBUFFERED=1
FAILED=()

run() {  # run NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 left rc
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if ((left < ${GPU_RUN_MIN_LEFT:-20})); then
    echo "== $name: SKIPPED, ${left}s left of the ${BUDGET}s budget" | tee -a "$OUT/summary.txt"
    FAILED+=("$name(skipped)")
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, $((SECONDS - START))s elapsed)"
  if [ "${GPU_RUN_STREAM:-0}" = 1 ]; then
    timeout --signal=INT --kill-after="${GPU_RUN_KILL_AFTER:-10}" "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
  else
    timeout --signal=INT --kill-after="${GPU_RUN_KILL_AFTER:-10}" "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    tail -n 25 "$LOGS/$name.log"
  fi
  echo "== $name: rc=$rc after $((SECONDS - START))s" | tee -a "$OUT/summary.txt"
  if ((rc != 0)); then FAILED+=("$name"); fi
}
has() { [[ " ${STEPS:-} " == *" $1 "* ]]; }

use_wheels() {  # use_wheels [EXTRA_PATH]
  local path="src${1:+:$1}"
  if compgen -G ".whl/*.whl" >/dev/null; then
    [ -d /tmp/site/flashinfer ] || pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    path="/tmp/site:$path"
  fi
  export PYTHONPATH="$path"
}

# FlashInfer JIT warm-up, so timed steps do not compile. First compiles: ~100 s per prefill module (one per
# head_dim: it also serves masks and tensor-core decode), ~11 s per CUDA-core decode module; callers run the
# independent shapes in parallel processes. KINDS: comma-separated decode, prefill, masked.
warm() {
  python - "$@" <<'PY'
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
PY
}
export -f warm
