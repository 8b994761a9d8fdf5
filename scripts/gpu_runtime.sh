#!/usr/bin/env bash
# GPU run for the runtime (issue 5) and the model roster: FlashInfer JIT warm-up, the GPU tests, and
# `pie bench --e2e` (N inferlets generating through the runtime and SDK beside the executor-only figure),
# plus the runtime's host cost against a no-op driver. Logs and bench JSON go to $OUT.
#
# Usage (repository root, on the GPU machine):  bash scripts/gpu_runtime.sh [STEP ...]
# Steps: warm tests families moe bench-qwen3 bench-llama1b bench-8b noop run   (default: all but families/moe)
# The whole run stays under PIE_GPU_BUDGET_S seconds (default 560).
source "$(dirname "$0")/gpu_lib.sh"
export PIE_PARITY_LOG="$LOGS/parity.tsv"
STEPS="${*:-warm tests bench-qwen3 bench-llama1b noop run}"

use_wheels
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$LOGS/env.log"

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
