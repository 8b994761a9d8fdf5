"""pie.config: schema defaults, every validation error class, TOML round trip, set_value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from test_hub import add_cached_repo, checkpoint_files, isolate

from pie.config import (
    CudaNativeOptions,
    DevOptions,
    default_config,
    load_config,
    load_or_default,
    loader,
    parse_config,
    parse_value,
    set_value,
    to_toml,
    write_config,
)
from pie.errors import ConfigError, ModelError
from pie.paths import EMBEDDED_MODEL_ID, default_config_path


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate(tmp_path, monkeypatch)


def parse(text: str):
    return parse_config(tomllib.loads(text), "cfg.toml")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert str(e.value).startswith("cfg.toml: ")  # every message names the file
    return str(e.value)


DEV = '[[model]]\nname = "a"\n[model.driver]\ntype = "dev"\n'
CUDA = '[[model]]\nname = "a"\n[model.driver]\ntype = "cuda_native"\n'


def test_defaults_filled_in() -> None:
    dev = parse(DEV).default_model
    assert dev.hf_repo == EMBEDDED_MODEL_ID
    assert (dev.driver.device, dev.driver.activation_dtype, dev.driver.tensor_parallel_size) == (
        ["cpu"],
        "float32",
        1,
    )
    assert dev.driver.options == DevOptions()
    assert (dev.driver.options.kv_page_size, dev.driver.options.gpu_mem_utilization) == (16, 0.8)
    cuda = parse("[[model]]\n").default_model  # no driver table at all: cuda_native defaults
    assert (cuda.name, cuda.driver.type, cuda.driver.device, cuda.driver.activation_dtype) == (
        "default", "cuda_native", ["cuda:0"], "bfloat16",
    )  # fmt: skip
    opts = cuda.driver.options
    assert isinstance(opts, CudaNativeOptions)
    assert (opts.kv_page_size, opts.max_num_kv_pages, opts.gpu_mem_utilization, opts.ready_timeout_s) == (
        32, 1024, 0.85, 600.0,
    )  # fmt: skip


def test_values_and_shorthands() -> None:
    cfg = parse(DEV + 'device = "cuda:1"\n[model.driver.options]\ngpu_mem_utilization = 1\nvenv = "/v"\n')
    d = cfg.default_model.driver
    assert d.device == ["cuda:1"] and d.activation_dtype == "bfloat16"
    assert d.options.gpu_mem_utilization == 1.0 and isinstance(d.options.gpu_mem_utilization, float)
    assert d.options.venv == "/v" and d.options.python is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown key + closest valid key, naming the section
        (CUDA + "[model.driver.options]\ngpu_mem_utilisation = 0.5\n",
         ["[model.driver.options]", "unknown key 'gpu_mem_utilisation'", "did you mean 'gpu_mem_utilization'?"]),
        ('[[model]]\nhf_rep = "x"\n', ["[[model]]", "unknown key 'hf_rep'", "did you mean 'hf_repo'?"]),
        (DEV + "devcie = 'cpu'\n", ["[model.driver]", "did you mean 'device'?"]),
        ("nodel = 1\n[[model]]\n", ["unknown key 'nodel'", "did you mean 'model'?"]),
        # a key of the other driver type
        (DEV + "[model.driver.options]\nswap_pool_size = 8\n",
         ["'swap_pool_size' is a cuda_native option", "does not apply to driver type 'dev'"]),
        (CUDA + "[model.driver.options]\nmax_num_adapters = 8\n", ["'max_num_adapters' is a dev option"]),
        # wrong types
        (DEV + '[model.driver.options]\nkv_page_size = "16"\n', ["'kv_page_size' must be an integer", '"16"']),
        (DEV + "[model.driver.options]\nmax_batch_size = true\n", ["'max_batch_size' must be an integer"]),
        (DEV + "[model.driver.options]\ngpu_mem_utilization = 'lots'\n", ["must be a number"]),
        ('[[model]]\nname = 3\n', ["'name' must be a string"]),
        (DEV + "device = 0\n", ["'device' must be a list of strings"]),
        ("model = 3\n", ["'model' must be an array of [[model]] tables"]),
        ("[model]\nname = 'a'\n", ["[[model]] (double brackets)"]),
        (DEV + "options = 3\n", ["'options' must be a table"]),
        # ranges
        (DEV + "[model.driver.options]\ngpu_mem_utilization = 1.5\n", ["'gpu_mem_utilization' must be in (0, 1]"]),
        (CUDA + "[model.driver.options]\ngpu_mem_utilization = 0\n", ["must be in (0, 1], got 0"]),
        (CUDA + "[model.driver.options]\nmax_batch_tokens = 0\n", ["'max_batch_tokens' must be >= 1"]),
        (CUDA + "[model.driver.options]\nready_timeout_s = -1\n", ["'ready_timeout_s' must be > 0"]),
        (DEV + "[model.driver.options]\nkv_page_size = 24\n", ["'kv_page_size' must be a power of two", "24"]),
        (CUDA + "[model.driver.options]\nkv_page_size = 0\n", ["'kv_page_size' must be >= 1"]),
        # devices
        (CUDA + "device = ['cpu']\n", ['device "cpu" is valid for driver type dev only']),
        (DEV + "device = ['gpu0']\n", ['bad device "gpu0"', '"cuda:N"']),
        (DEV + "device = ['cuda']\n", ['bad device "cuda"']),
        (DEV + "device = []\n", ["'device' is empty"]),
        (DEV + "device = ['cuda:0', 'cuda:0']\n", ["lists a device twice"]),
        (DEV + "device = ['cuda:0', 'cuda:1']\n", ["one device per tensor-parallel rank"]),
        # choices
        ("[[model]]\n[model.driver]\ntype = 'cuda_nativ'\n",
         ["'type' must be one of \"cuda_native\", \"dev\"", 'did you mean "cuda_native"?']),
        (DEV + "activation_dtype = 'fp16'\n", ["'activation_dtype' must be one of \"bfloat16\", \"float16\", \"float32\""]),
        (DEV + "[model.driver.options]\nweight_dtype = 'fp32'\n", ["'weight_dtype' must be one of", '"auto"']),
        (CUDA + "[model.driver.options]\nruntime_quant = 'int8'\n", ["'runtime_quant' must be one of"]),
        # quantization: formats that conflict, KV dtypes that do not exist
        (CUDA + "[model.driver.options]\nweight_dtype = 'int4'\nruntime_quant = 'fp8'\n",
         ['runtime_quant = "fp8" runs the weights in FP8 but weight_dtype = "int4"']),
        (DEV + "[model.driver.options]\nkv_cache_dtype = 'fp8_e4m2'\n",
         ["'kv_cache_dtype' must be one of \"auto\", \"fp8_e4m3\"", 'did you mean "fp8_e4m3"?']),
        (DEV + "[model.driver.options]\nruntime_quant = 'fp8'\n", ["'runtime_quant' is a cuda_native option"]),
        # swap, page caps
        (CUDA + "[model.driver.options]\nswap_pool_size = -1\n", ["'swap_pool_size' must be >= 0, got -1"]),
        (CUDA + "[model.driver.options]\nswap_pool_size = 1.5\n", ["'swap_pool_size' must be an integer"]),
        (DEV + "[model.driver.options]\ncpu_mem_budget_in_gb = -2\n", ["'cpu_mem_budget_in_gb' must be >= 0"]),
        (DEV + "[model.driver.options]\ncpu_mem_budget_in_gb = 'lots'\n", ["must be a number"]),
        (DEV + "[model.driver.options]\nmax_num_kv_pages = 0\n", ["'max_num_kv_pages' must be >= 1, got 0"]),
        (DEV + "[model.driver.options]\nmax_num_kv_pages = 2.5\n", ["'max_num_kv_pages' must be an integer"]),
        # [runtime]
        (DEV + "[runtime]\nsnapshot_dri = 'x'\n",
         ["[runtime]: unknown key 'snapshot_dri'", "did you mean 'snapshot_dir'?", "valid keys: snapshot_dir"]),
        (DEV + "[runtime]\nsnapshot_dir = 3\n", ["[runtime]: 'snapshot_dir' must be a string, got 3"]),
        ("runtime = 3\n" + DEV, ["'runtime' must be a table ([runtime])"]),
        ("runtim = 3\n" + DEV, ["top level: unknown key 'runtim'", "did you mean 'runtime'?"]),
        (CUDA + "tensor_parallel_size = 3\ndevice = ['cuda:0', 'cuda:1']\n",
         ["give one device per tensor-parallel rank: tensor_parallel_size = 3 but 2 devices are listed"]),
        (DEV + "tensor_parallel_size = 2\ndevice = ['cpu', 'cuda:0']\n", ["mixes cpu and cuda devices"]),
        (CUDA + "tensor_parallel_size = 2\ndevice = ['cuda:0', 'cuda:0']\n", ["lists a device twice"]),
        # models
        ("[[model]]\nname = 'a'\n[[model]]\nname = 'b'\n[[model]]\nname = 'a'\n",
         ["duplicate model name 'a' (blocks 1 and 3)"]),
        ("model = []\n", ["no [[model]] block"]),
        ("", ["no [[model]] block"]),
        ("[[model]]\nname = ''\n", ["'name' must not be empty"]),
        (DEV + "[model.driver.options]\nvenv = '/v'\npython = '/p'\n", ["set either 'venv' or 'python'"]),
    ],
)  # fmt: skip
def test_validation_errors(text: str, expected: list[str]) -> None:
    msg = error_of(text)
    for part in expected:
        assert part in msg, (part, msg)


def test_tensor_parallel_devices() -> None:
    gpu = parse(CUDA + "tensor_parallel_size = 2\ndevice = ['cuda:0', 'cuda:1']\n").default_model.driver
    assert (gpu.tensor_parallel_size, gpu.device, gpu.activation_dtype) == (
        2,
        ["cuda:0", "cuda:1"],
        "bfloat16",
    )
    # CPU ranks are processes on one host: "cpu" may repeat (the CI tests' layout)
    cpu = parse(DEV + "tensor_parallel_size = 2\ndevice = ['cpu', 'cpu']\n").default_model.driver
    assert (cpu.device, cpu.activation_dtype) == (["cpu", "cpu"], "float32")


def test_all_problems_reported_together() -> None:
    msg = error_of(DEV + "[model.driver.options]\nkv_page_size = 24\ngpu_mem_utilization = 2.0\nbogus = 1\n")
    assert "3 problems" in msg and "power of two" in msg and "(0, 1]" in msg and "'bogus'" in msg


def test_valid_edge_values() -> None:
    opts = parse(CUDA + "[model.driver.options]\ngpu_mem_utilization = 1.0\nkv_page_size = 1\n").default_model
    assert opts.driver.options.kv_page_size == 1
    assert parse(DEV + "[model.driver.options]\nweight_dtype = 'float32'\ncpu_mem_budget_in_gb = 0\n")


def test_quantization_options_parse_and_reach_the_executor_spec() -> None:
    """weight_dtype int8/int4/float8 with any activation dtype, runtime_quant fp8 (= float8 weights) and
    kv_cache_dtype fp8_e4m3 are valid and arrive in the ExecutorSpec the factory builds."""
    from pie.drivers.factory import executor_spec

    for wd in ("int8", "int4", "float8"):
        cfg = parse(DEV + f"activation_dtype = 'bfloat16'\n[model.driver.options]\nweight_dtype = '{wd}'\n")
        assert cfg.default_model.driver.options.weight_dtype == wd
    dev = parse(DEV + "[model.driver.options]\nweight_dtype = 'int4'\nkv_cache_dtype = 'fp8_e4m3'\n")
    spec = executor_spec(dev.default_model)
    assert (spec.weight_dtype, spec.kv_cache_dtype) == ("int4", "fp8_e4m3")
    cuda = parse(CUDA + "[model.driver.options]\nruntime_quant = 'fp8'\n").default_model
    assert cuda.driver.options.runtime_quant == "fp8"
    assert executor_spec(cuda).weight_dtype == "float8"
    assert executor_spec(parse(CUDA).default_model).kv_cache_dtype == "auto"


def test_swap_page_cap_and_runtime_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = parse(CUDA + "[model.driver.options]\nswap_pool_size = 64\n").default_model.driver.options
    assert cuda.swap_pool_size == 64
    dev = parse(DEV + "[model.driver.options]\ncpu_mem_budget_in_gb = 2\nmax_num_kv_pages = 8\n")
    opts = dev.default_model.driver.options
    assert opts.cpu_mem_budget_in_gb == 2.0 and isinstance(opts.cpu_mem_budget_in_gb, float)
    assert opts.max_num_kv_pages == 8 and DevOptions().max_num_kv_pages is None
    assert dev.runtime.snapshot_dir == "" and dev.runtime.snapshot_path() is None
    monkeypatch.setenv("PIE_HOME", str(tmp_path / "home"))
    rel = parse(DEV + "[runtime]\nsnapshot_dir = 'snaps'\n").runtime
    assert rel.snapshot_path() == tmp_path / "home" / "snaps"
    absolute = parse(DEV + f"[runtime]\nsnapshot_dir = '{tmp_path / 'abs'}'\n").runtime
    assert absolute.snapshot_path() == tmp_path / "abs"
    out = to_toml(
        parse(DEV + "[runtime]\nsnapshot_dir = 'snaps'\n[model.driver.options]\nmax_num_kv_pages = 8\n")
    )
    assert "[runtime]" in out and 'snapshot_dir = "snaps"' in out and "max_num_kv_pages = 8" in out
    assert "# max_num_kv_pages = (unset)" in to_toml(parse(DEV))


def test_binary_path_accepted_and_warned_once(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(loader, "_warned_binary_path", False)
    text = CUDA + "[model.driver.options]\nbinary_path = '/opt/pie/driver'\n"
    cfg = parse(text)
    parse(text)
    assert cfg.default_model.driver.options.binary_path == "/opt/pie/driver"
    err = capsys.readouterr().err
    assert err.count("'binary_path' is ignored") == 1 and "cfg.toml" in err
    assert "binary_path = " in to_toml(cfg)  # kept when set, omitted when empty
    assert "binary_path" not in to_toml(parse(CUDA))


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text('[[model]]\nname = "a"\nhf_repo = \n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "line 3" in str(e.value) and e.value.exit_code == 2


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(DEV + "[model.driver.options]\nkv_page_size = 24\n")
    with pytest.raises(ConfigError, match=f"^{p}: .*power of two"):
        load_config(p)
    p.write_bytes(b"\xff\xfe[[model]]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="pie config init"):
        load_config()
    monkeypatch.setattr(loader, "_cuda_available", lambda: False)
    cfg, existed = load_or_default()
    assert not existed and cfg.default_model.driver.type == "dev"
    with pytest.raises(ConfigError, match="pie config init"):
        load_or_default(tmp_path / "typo.toml")  # an explicit path must exist
    write_config(cfg)
    assert default_config_path().is_file()
    assert load_or_default() == (cfg, True)


@pytest.mark.parametrize("cuda", [False, True])
def test_default_config(cuda: bool, env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_cuda_available", lambda: cuda)
    d = default_config().default_model
    assert d.hf_repo == EMBEDDED_MODEL_ID
    if cuda:
        assert (d.driver.type, d.driver.device, d.driver.activation_dtype) == (
            "cuda_native",
            ["cuda:0"],
            "bfloat16",
        )
    else:
        assert (d.driver.type, d.driver.device, d.driver.activation_dtype) == ("dev", ["cpu"], "float32")
    add_cached_repo(env, "Qwen/Qwen3-0.6B", checkpoint_files())
    assert default_config().default_model.hf_repo == "Qwen/Qwen3-0.6B"


def test_default_config_detects_this_machine() -> None:
    import torch

    expected = "cuda_native" if torch.cuda.is_available() else "dev"
    assert default_config().default_model.driver.type == expected


@pytest.mark.parametrize(
    "text", [DEV, CUDA, DEV + "device = 'cuda:0'\n[model.driver.options]\npython = '/x'\n"]
)
def test_to_toml_round_trip_with_help(text: str) -> None:
    cfg = parse(text + '[[model]]\nname = "b"\nhf_repo = "org/m"\n')
    out = to_toml(cfg)
    assert parse_config(tomllib.loads(out), "x") == cfg
    assert "# KV cache page size in tokens" in out and out.count("[[model]]") == 2


def test_model_lookup() -> None:
    cfg = parse('[[model]]\nname = "a"\n[[model]]\nname = "b"\n')
    assert cfg.default_model.name == "a" and cfg.model("b").name == "b" and cfg.model(None).name == "a"
    with pytest.raises(ModelError, match="no model named 'c'.*'a', 'b'"):
        cfg.model("c")


@pytest.mark.parametrize(
    ("raw", "value"),
    [("16", 16), ("0.9", 0.9), ("true", True), ('["cuda:0"]', ["cuda:0"]), ('"x y"', "x y"), ("cpu", "cpu"),
     ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"), ("", ""), ("1\nx = 2", "1\nx = 2")],
)  # fmt: skip
def test_parse_value(raw: str, value) -> None:
    assert parse_value(raw) == value


def _init_file(path: Path, cuda: bool = False) -> Path:
    base = CUDA if cuda else DEV
    path.write_text(base)
    return path


def test_set_value(tmp_path: Path) -> None:
    p = _init_file(tmp_path / "c.toml")
    cfg, _ = set_value(p, "model.driver.options.kv_page_size", "32")
    assert cfg.default_model.driver.options.kv_page_size == 32
    set_value(p, "model.0.hf_repo", "Qwen/Qwen3-0.6B")
    set_value(p, "model.driver.device", "cuda:0")
    set_value(p, "model.driver.options.venv", "/opt/venv")
    set_value(p, "model.1.name", "second")  # index == number of blocks appends one
    cfg = load_config(p)
    first = cfg.default_model
    assert (first.hf_repo, first.driver.device, first.driver.options.venv) == (
        "Qwen/Qwen3-0.6B",
        ["cuda:0"],
        "/opt/venv",
    )
    assert first.driver.options.kv_page_size == 32 and [m.name for m in cfg.models] == ["a", "second"]
    set_value(p, "model.driver.options.venv", "")  # "" unsets
    assert load_config(p).default_model.driver.options.venv is None
    set_value(p, "runtime.snapshot_dir", "snaps")
    set_value(p, "model.driver.options.max_num_kv_pages", "12")
    set_value(p, "model.driver.options.cpu_mem_budget_in_gb", "0.5")
    cfg = load_config(p)
    assert cfg.runtime.snapshot_dir == "snaps" and cfg.default_model.driver.options.max_num_kv_pages == 12
    assert cfg.default_model.driver.options.cpu_mem_budget_in_gb == 0.5
    set_value(p, "model.driver.options.max_num_kv_pages", "")  # "" unsets an optional integer too
    assert load_config(p).default_model.driver.options.max_num_kv_pages is None
    assert "# KV cache page size in tokens" in p.read_text()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("model.driver.options.kv_page_size", "24", "power of two"),
        ("model.driver.options.gpu_mem_utilisation", "0.5", "did you mean 'gpu_mem_utilization'"),
        ("model.driver.options.weight_dtype", "int5", "'weight_dtype' must be one of"),
        ("runtime.snapshot_dri", "x", "did you mean 'snapshot_dir'"),
        ("runtime.snapshot_dir", "3", "'snapshot_dir' must be a string"),
        ("model.driver.device", "gpu", 'bad device "gpu"'),
        ("model.5.name", "x", "1 [[model]] blocks"),
        ("model.name.x", "1", "is a value, not a table"),
        ("model..name", "1", "bad key"),
        ("model.1.name", "a", "duplicate model name 'a'"),
    ],
)
def test_bad_set_leaves_file_unchanged(tmp_path: Path, key: str, value: str, expected: str) -> None:
    p = _init_file(tmp_path / "c.toml")
    before = p.read_bytes()
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        set_value(p, key, value)
    assert p.read_bytes() == before


def test_set_driver_type_drops_other_driver_options(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    write_config(parse(CUDA + "device = ['cuda:0']\n[model.driver.options]\nswap_pool_size = 64\n"), p)
    cfg, notes = set_value(p, "model.driver.type", "dev")
    assert cfg.default_model.driver.type == "dev" and isinstance(cfg.default_model.driver.options, DevOptions)
    assert notes and "swap_pool_size" in notes[0]
    assert cfg.default_model.driver.options.max_num_kv_pages == 1024  # a key both drivers have is kept
    assert cfg.default_model.driver.options.kv_page_size == 32  # shared keys keep their values


def test_set_on_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pie config init"):
        set_value(tmp_path / "none.toml", "model.name", "x")


def test_dev_timeouts_come_from_the_config() -> None:
    from pie.drivers.factory import create_driver

    cfg = parse(
        '[[model]]\nhf_repo = "pie/embedded-default"\n[model.driver]\ntype = "dev"\n'
        "[model.driver.options]\nready_timeout_s = 7\nshutdown_timeout_s = 0.25\nheartbeat_timeout_s = 3\n"
    )
    driver = create_driver(cfg.default_model)
    assert (driver.ready_timeout_s, driver.shutdown_timeout_s, driver.heartbeat_timeout_s) == (7.0, 0.25, 3.0)
    defaults = create_driver(parse('[[model]]\n[model.driver]\ntype = "dev"\n').default_model)
    assert (defaults.ready_timeout_s, defaults.shutdown_timeout_s) == (600.0, 5.0)
    assert "must be > 0" in error_of(
        '[[model]]\n[model.driver]\ntype = "dev"\n[model.driver.options]\nshutdown_timeout_s = 0\n'
    )


def test_mixed_precision_is_caught_at_validation() -> None:
    """activation_dtype float16/float32 with cuda_native's default weight_dtype used to pass validation
    and fail at driver start ("mixed precision not implemented")."""
    for act in ("float16", "float32"):
        cfg = parse(f'[[model]]\n[model.driver]\nactivation_dtype = "{act}"\n')
        assert cfg.default_model.driver.options.weight_dtype == act  # the default follows
        from pie.drivers.executor import resolve_dtypes

        resolve_dtypes(act, cfg.default_model.driver.options.weight_dtype)  # what the driver checks
    msg = error_of(
        '[[model]]\n[model.driver]\nactivation_dtype = "float16"\n'
        '[model.driver.options]\nweight_dtype = "bfloat16"\n'
    )
    assert (
        'weight_dtype = "bfloat16" with activation_dtype = "float16": mixed precision is not implemented'
        in msg
    )
    assert 'set weight_dtype = "auto"' in msg
    dev = error_of(
        '[[model]]\n[model.driver]\ntype = "dev"\n[model.driver.options]\nweight_dtype = "float16"\n'
    )  # dev on cpu: activation float32 by default
    assert 'weight_dtype = "float16" with activation_dtype = "float32"' in dev
    ok = parse('[[model]]\n[model.driver]\ntype = "dev"\n[model.driver.options]\nweight_dtype = "float32"\n')
    assert ok.default_model.driver.options.weight_dtype == "float32"


def test_integers_too_large_for_the_wire_are_rejected() -> None:
    msg = error_of(
        '[[model]]\n[model.driver]\ntype = "dev"\n[model.driver.options]\n'
        "max_batch_tokens = 99999999999999999999\nmax_batch_size = 2147483648\n"
    )
    assert "'max_batch_tokens' must be at most 2147483647, got 99999999999999999999" in msg
    assert "'max_batch_size' must be at most 2147483647" in msg
    capped = error_of(
        '[[model]]\n[model.driver]\ntype = "dev"\n[model.driver.options]\nmax_num_kv_pages = 2147483648\n'
    )
    assert "'max_num_kv_pages' must be at most 2147483647" in capped  # an optional int is bounded too
    assert parse(
        '[[model]]\n[model.driver]\ntype = "dev"\n[model.driver.options]\nmax_batch_size = 2147483647\n'
    )


def test_unwritable_pie_home_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from pie.cli.main import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PIE_HOME", str(blocker / "pie"))  # a path under a file: mkdir fails, even as root
    assert main(["config", "init"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {blocker / 'pie' / 'config.toml'}" in err and "must be a writable directory" in err
    assert "Traceback" not in err
    assert main(["driver", "dev", "set", "python", "python3"]) == 2
    assert "dev-driver.toml" in capsys.readouterr().err
