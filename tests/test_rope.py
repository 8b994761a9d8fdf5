"""pie's rope tables against transformers' own ROPE_INIT_FUNCTIONS (inverse frequencies and cos/sin scale)
for every rope type pie implements, in both config layouts, plus Mistral 3's llama_4 query scale."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pie.errors import ModelError
from pie.layers.rotary import RotaryEmbedding, llama4_query_scale, rope_inv_freq
from pie.models.config import parse_rope, rope_dicts

BASE = dict(hidden_size=512, num_attention_heads=4, head_dim=128, max_position_embeddings=131072)
CASES = {
    "linear": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 5e5},
    "yarn_olmo3": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                   "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1, "rope_theta": 5e5},
    "yarn_mscale": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16384,
                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                    "rope_theta": 1e6, "llama_4_scaling_beta": 0.1},
    "yarn_plain": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "rope_theta": 1e4},
    "yarn_no_truncate": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0},
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_and_scale_equal_transformers(name):
    params = dict(CASES[name])
    cfg = transformers.LlamaConfig(**BASE, rope_parameters=dict(params))
    want, want_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    spec = parse_rope(rope_dicts({"rope_parameters": params})[""], BASE["max_position_embeddings"], name)
    got, scale = rope_inv_freq(128, spec)
    assert torch.equal(got, want.float()) and scale == pytest.approx(want_scale, rel=1e-12)


def test_older_layout_rope_scaling_equals_rope_parameters():
    old = {"rope_theta": 5e5, "rope_scaling": {k: v for k, v in CASES["llama3"].items() if k != "rope_theta"}}
    assert parse_rope(rope_dicts(old)[""], 8192, "x") == parse_rope(
        rope_dicts({"rope_parameters": CASES["llama3"]})[""], 8192, "x"
    )
    # a top-level original_max_position_embeddings overrides the dict's (transformers' standardize rule)
    spec = parse_rope(rope_dicts({**old, "original_max_position_embeddings": 1024})[""], 8192, "x")
    assert spec.original_max_position_embeddings == 1024


def test_yarn_scales_cos_and_sin():
    spec = parse_rope(CASES["yarn_mscale"], 131072, "x")
    rot = RotaryEmbedding(8, 64, parse_rope(CASES["yarn_olmo3"], 65536, "x"))
    cs = rot.cos_sin(torch.device("cpu"))
    assert torch.allclose(cs[0, :4], torch.full((4,), 1.2079441541679836))  # cos(0) * attention factor
    assert rope_inv_freq(8, spec)[1] == pytest.approx(1.0)  # mscale == mscale_all_dim -> factor 1


def test_llama4_query_scale():
    spec = parse_rope(CASES["yarn_mscale"], 131072, "x")
    pos = torch.tensor([0, 16383, 16384, 3 * 16384 + 5])
    want = 1 + 0.1 * torch.log(1 + torch.floor(pos / 16384))
    assert torch.equal(llama4_query_scale(pos, spec), want)
    assert llama4_query_scale(pos, parse_rope(CASES["linear"], 10, "x")) is None


def test_unsupported_rope_type_is_named():
    with pytest.raises(ModelError, match="rope type 'longrope' is not supported"):
        parse_rope({"rope_type": "longrope"}, 10, "phi3 rope")
