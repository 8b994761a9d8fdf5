#!/usr/bin/env bash
# What the lead runs on the lent GPU machine in one call (see .library/device): install the carried
# FlashInfer wheels, restore FlashInfer's JIT cache if one was carried (.jitcache/), optionally train
# the embedded default model (TRAIN=1) while FlashInfer compiles, then scripts/gpu_check.sh.
# Everything comes back in at most 8 files under $OUT: results.tar.gz (logs, bench JSON, profiles),
# the trained model files, and the JIT cache in <16 MB parts.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
WORK=$(mktemp -d)
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src
if compgen -G ".jitcache/jit.tar.gz.part*" >/dev/null; then
  mkdir -p ~/.cache && cat .jitcache/jit.tar.gz.part* | tar -xz -C ~/.cache && echo "restored FlashInfer JIT cache"
fi
if [ "${TRAIN:-0}" = 1 ]; then
  # Trains into the machine's copy of the tree, so the `pie run` smoke steps use the new model.
  # In the foreground: its time budget is planned from the first steps' speed, which a concurrent
  # FlashInfer compile would distort.
  python scripts/train_default_model.py --minutes "${TRAIN_MINUTES:-3}" ${TRAIN_ARGS:-} \
    --out src/pie/assets/default-model >"$WORK/train.log" 2>&1 || echo "training failed"
fi
OUT="$WORK/check" PIE_GPU_BUDGET_S="${PIE_GPU_BUDGET_S:-480}" bash scripts/gpu_check.sh ${GPU_CHECK_ARGS:-}
rc=$?
if [ "${TRAIN:-0}" = 1 ]; then
  tail -40 "$WORK/train.log"
  M=src/pie/assets/default-model
  cp $M/config.json $M/generation_config.json "$OUT/"
  split -b 15m -d $M/model.safetensors "$OUT/model.safetensors.part"  # files come back at most 16 MB each
  (cd $M && sha256sum model.safetensors) >"$WORK/check/model.sha256"
  cp "$WORK/train.log" "$WORK/check/"
fi
tar -czf "$OUT/results.tar.gz" -C "$WORK" check
if [ -d ~/.cache/flashinfer ]; then
  # only the built modules (*.so): FlashInfer reuses a module whose .so exists; sources and objects stay
  (cd ~/.cache && find flashinfer -name '*.so' -print0 | tar -cz --null -T -) | split -b 15m -d - "$OUT/jit.tar.gz.part"
fi
ls -la "$OUT"
exit $rc
