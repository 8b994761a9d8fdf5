"""Each quantized format's accuracy bounds on the embedded default model (CPU, fp32 activations): KL
divergence and top-1 agreement against the unquantized model over a fixed text (pie.bench.quant_accuracy,
the measurement behind docs/quantization.md's table), and the memory each saves.

Bounds sit about 2x above what the formats measure (the docs table), so a regression in a quantizer, a
kernel or the FP8 KV path fails here, while the run-to-run noise of CPU kernels does not.
"""

from __future__ import annotations

import pytest

from pie.bench.quant_accuracy import CONFIGS, FIXED_TEXT, measure
from pie.models.tokenizer import Tokenizer
from pie.paths import embedded_model_dir

# label -> (max mean KL in nats, min top-1 agreement, max weights ratio, KV page ratio)
BOUNDS = {
    "int8": (2e-3, 0.97, 0.5, 1.0),
    "int4": (0.3, 0.70, 0.4, 1.0),
    "float8": (0.05, 0.92, 0.5, 1.0),
    "fp8 KV": (0.015, 0.94, 1.0, 0.25),
    "float8 + fp8 KV": (0.06, 0.92, 0.5, 0.25),
}


@pytest.fixture(scope="module")
def results():
    d = str(embedded_model_dir())
    ids = Tokenizer.from_dir(d).encode(FIXED_TEXT)[:160]
    return {r.label: r for r in measure(d, ids)}


def test_reference_is_itself(results):
    ref = results["reference"]
    assert ref.mean_kl == 0 and ref.top1 == 1.0 and ref.kernels == {}


@pytest.mark.parametrize("label", [c[0] for c in CONFIGS[1:]])
def test_format_within_its_bounds(results, label):
    r, ref = results[label], results["reference"]
    max_kl, min_top1, weights_ratio, kv_ratio = BOUNDS[label]
    assert 0 < r.mean_kl < max_kl, r.mean_kl  # > 0: the format really ran
    assert r.top1 >= min_top1, r.top1
    assert r.weights_bytes <= weights_ratio * ref.weights_bytes
    assert r.kv_page_bytes == kv_ratio * ref.kv_page_bytes  # fp32 reference: e4m3 pages are a quarter
    assert "dequant" not in r.kernels  # the CPU kernels ran, not the fallback
