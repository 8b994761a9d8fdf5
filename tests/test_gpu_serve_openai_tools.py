"""test_serve_openai_tools on the cuda_native driver (the embedded model in bf16): grammar masks applied
on the GPU's logits, forced tool calls and JSON schemas through `pie serve` with the `openai` client."""

from __future__ import annotations

import pytest
from gpu_marks import needs_cuda
from serve_util import Server
from test_serve_openai_tools import (  # noqa: F401 - collected here with this module's fixtures
    client,
    test_json_object_n_choices,
    test_json_schema_streaming_matches,
    test_json_schema_validates,
    test_tool_call_streaming_final_chunk,
    test_tool_choice_required_and_named,
    test_tool_history_round_trip_and_auto_shape,
)

pytestmark = [pytest.mark.gpu, needs_cuda]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("gpu-serve-tools")
    cfg = home / "config.toml"
    cfg.write_text(
        '[[model]]\nname = "default"\nhf_repo = "pie/embedded-default"\n[model.driver]\ntype = "cuda_native"\n'
        'device = ["cuda:0"]\nactivation_dtype = "bfloat16"\n'
    )
    s = Server(home / "home", "-c", str(cfg))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
