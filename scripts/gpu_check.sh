#!/usr/bin/env bash
# The one command for the GPU machine: install the carried FlashInfer wheels, warm FlashInfer's JIT,
# run the GPU tests, the CPU suite's parity tests and `pie bench` (Qwen3-0.6B, Llama-3.2-1B, then
# Llama-3.1-8B if time is left). Logs, bench JSON and profiles go to $OUT (default: a temp dir).
#
# Usage (from the repository root):  bash scripts/gpu_check.sh
# Whole run stays under PIE_GPU_BUDGET_S seconds (default 530, under the 9-minute mark); a step that
# would start with too little time left is skipped and reported. Exit status: 0 only if every step passed.
GPU_BUDGET_DEFAULT=530 GPU_LOG_DIR=. GPU_RUN_MIN_LEFT=30 GPU_RUN_KILL_AFTER=15 GPU_RUN_STREAM=1
source "$(dirname "$0")/gpu_lib.sh"
export PIE_PARITY_LOG="$OUT/parity.tsv"
# ---- environment -----------------------------------------------------------------------------------
use_wheels
{
  nvidia-smi
  python -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.version.cuda, "transformers", transformers.__version__, "device", torch.cuda.get_device_name(0))'
  python -c 'import flashinfer; print("flashinfer", flashinfer.__version__)'
} 2>&1 | tee "$OUT/env.log"

# ---- FlashInfer JIT warm-up ---------------------------------------------------------------------------
# The independent modules build in parallel processes: head_dim 64 (tests, Llama-3.2-1B), head_dim 128
# (Qwen3, Llama-3.1-8B), and mask packing; warm() is in gpu_lib.sh.
warm_all() {
  warm packbits &
  warm 16 8 128 decode,prefill &
  warm 4 2 64 decode,prefill,masked &
  local ok=0
  for job in $(jobs -p); do wait "$job" || ok=1; done
  warm 8 2 64 decode || ok=1  # tensor-core decode reuses the head_dim-64 prefill module
  return $ok
}
export -f warm_all
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
