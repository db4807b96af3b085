"""proxy.ini parsing: types, durations, and one clear line for every mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smart_proxy.config import AUTO_MEMORY, gpu_setting, load_config, parse_duration, parse_size, structure
from smart_proxy.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("7", 7.0), ("1.5s", 1.5), (" 2m ", 120.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("1024", 1024), ("512k", 512 * 1024), ("64m", 64 * 1024**2), ("64MB", 64 * 1024**2), ("1GiB", 1024**3),
     ("10b", 10), ("2GiB", 2 * 1024**3), ("512MB", 512 * 1024**2), ("1TiB", 1024**4), ("1.5g", 3 * 1024**3 // 2)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_proxy_operations_keys() -> None:
    proxy = structure(
        {"proxy": {"api_keys": "sk-a, sk-b sk-c", "api_key_file": "keys.txt", "cors_origins": "*", "max_body": "1m"}}
    ).proxy
    assert proxy.api_keys == ("sk-a", "sk-b", "sk-c")
    assert proxy.api_key_file == "keys.txt"
    assert proxy.cors_origins == ("*",)
    assert proxy.max_body == 1024**2
    defaults = structure({}).proxy
    assert (defaults.api_keys, defaults.cors_origins, defaults.max_body) == ((), (), 64 * 1024**2)


def test_defaults_and_types(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    ini = tmp_path / "proxy.ini"
    ini.write_text(
        "[proxy]\nport = 9000\n[pool]\nsize = 3 ; three at once\nload_timeout = 90s\n"
        "[model:m]\npath = m.gguf\nargs = --ctx-size 4096 --parallel 4\nembeddings = true\nidle_ttl = 5m\n"
    )
    config = load_config(ini)
    assert config.proxy.port == 9000
    assert config.proxy.host == "127.0.0.1"
    assert config.pool.size == 3
    assert config.pool.load_timeout == 90.0
    assert config.pool.llama_server == "auto"
    model = config.models["m"]
    assert model.args == ("--ctx-size", "4096", "--parallel", "4")
    assert model.embeddings is True
    assert model.idle_ttl == 300.0
    assert config.base_dir == str(tmp_path.resolve())


def test_queueing_settings() -> None:
    assert (structure({}).pool.queueing, structure({}).pool.min_residency) == ("swap-aware", 10.0)
    config = structure({"pool": {"queueing": "fifo", "min_residency": "2m"}})
    assert (config.pool.queueing, config.pool.min_residency) == ("fifo", 120.0)


def test_liveness_settings() -> None:
    config = structure({"pool": {"health_interval": "2s", "request_timeout": "1m"},
                        "model:a": {"path": "/etc/hostname", "request_timeout": "30s"}, "model:b": {"path": "/etc/hostname"}})
    assert (config.pool.health_interval, config.pool.health_timeout, config.pool.health_failures) == (2.0, 5.0, 3)
    assert config.pool.request_timeout == 60.0
    assert config.models["a"].request_timeout == 30.0 and config.models["b"].request_timeout is None


def test_agents_section(tmp_path: Path) -> None:
    ini = tmp_path / "proxy.ini"
    ini.write_text("[agents]\ndir = plugins\nenabled = rag, parallel json\ntimeout = 5s\ntimeout.parallel = 2m\n")
    agents = load_config(ini).agents
    assert agents.dir == "plugins"
    assert agents.enabled == ("rag", "parallel", "json")
    assert agents.timeout == 5.0
    assert agents.timeouts == {"parallel": 120.0}
    assert agents.timeout_for("parallel") == 120.0
    assert agents.timeout_for("rag") == 5.0


def test_agents_defaults() -> None:
    agents = structure({}).agents
    assert (agents.dir, agents.enabled, agents.timeout, agents.timeouts) == ("agents", (), 30.0, {})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"pool": {"size": "two"}}, "[pool] size: invalid value, expected int"),
        ({"pool": {"sise": "2"}}, "[pool] sise: unknown key"),
        ({"pool": {"load_timeout": "5 weeks"}}, "[pool] load_timeout: not a duration"),
        ({"pool": {"size": "0"}}, "[pool] size: must be at least 1"),
        ({"model:a": {"path": "/no/such/file.gguf"}}, "[model:a] path: no such file: /no/such/file.gguf"),
        ({"model:a": {"path": "/etc/hostname", "embeddings": "maybe"}}, "[model:a] embeddings: not a boolean"),
        ({"model:a": {"path": "/etc/hostname", "flavour": "x"}}, "[model:a] flavour: unknown key"),
        ({"model:a": {}}, "[model:a] path: missing"),
        ({"model:a": {"path": "package:no_such_package_xyz"}}, "package 'no_such_package_xyz' is not installed"),
        ({"model:a": {"backend": "ollama"}}, "[model:a] url: backend = ollama needs url"),
        ({"model:a": {"backend": "ollama", "url": "host:11434"}}, "[model:a] url: 'host:11434' is not an http://"),
        ({"bogus": {}}, "[bogus]: unknown section"),
        ({"model:a": {"repo": "no-slash"}}, "[model:a] repo: not a Hugging Face repo id: 'no-slash' (use ORG/NAME)"),
        ({"model:a": {"repo": "org/../etc"}}, "[model:a] repo: not a Hugging Face repo id"),
        ({"model:a": {"repo": "o/r", "path": "/etc/hostname"}}, "[model:a] repo: give path or repo, not both"),
        ({"model:a": {"repo": "o/r", "file": "a", "quant": "Q4_K_M"}}, "[model:a] quant: give file or quant, not both"),
        ({"model:a": {"repo": "o/r", "file": "../a.gguf"}}, "[model:a] file: must be a file name or glob inside the"),
        ({"model:a": {"repo": "o/r", "mmproj": "/abs/p.gguf"}}, "[model:a] mmproj: must be a file name or glob inside"),
        ({"model:a": {"repo": "o/r", "quant": "Q4 K"}}, "[model:a] quant: not a quantization tag: 'Q4 K'"),
        ({"model:a": {"repo": "o/r", "revision": "../../x"}}, "[model:a] revision: not a branch, tag or commit"),
        ({"model:a": {"path": "/etc/hostname", "quant": "Q4_K_M"}}, "[model:a] quant: needs repo = ORG/NAME"),
        ({"model:a": {"path": "/etc/hostname", "mmproj": "/no/such.gguf"}}, "[model:a] mmproj: no such file: /no/such"),
        ({"model:a": {"backend": "ollama", "url": "http://x", "repo": "o/r"}}, "[model:a] repo: only for backend"),
        ({"catalog": {"allow_hf": "perhaps"}}, "[catalog] allow_hf: not a boolean"),
        ({"catalog": {"allow_repos": "org/* ../x"}}, "[catalog] allow_repos: not a repo pattern: '../x'"),
        ({"catalog": {"allow": "true"}}, "[catalog] allow: unknown key"),
        ({"proxy": {"max_body": "lots"}}, "[proxy] max_body: not a size"),
        ({"proxy": {"max_body": "0"}}, "[proxy] max_body: must be at least 1 byte"),
        ({"proxy": {"api_kyes": "x"}}, "[proxy] api_kyes: unknown key"),
        ({"agents": {"timeout.parallel": "soon"}}, "[agents] timeout.parallel: not a duration"),
        ({"agents": {"timeout.rag": "0s"}}, "[agents] timeout.rag: must be more than 0"),
        ({"agents": {"timeout": "-1s"}}, "[agents] timeout: must be more than 0"),
        ({"agents": {"timeout./x": "1s"}}, "[agents] timeout./x: '/x' is not an agent name"),
        ({"agents": {"enabled": "rag, /parallel"}}, "[agents] enabled: '/parallel' is not an agent name"),
        ({"agents": {"enable": "rag"}}, "[agents] enable: unknown key"),
        ({"pool": {"health_interval": "-1s"}}, "[pool] health_interval: must be 0 (off) or more"),
        ({"pool": {"health_timeout": "0"}}, "[pool] health_timeout: must be more than 0"),
        ({"pool": {"health_failures": "0"}}, "[pool] health_failures: must be at least 1"),
        ({"pool": {"request_timeout": "-5s"}}, "[pool] request_timeout: must be 0 (off) or more"),
        ({"pool": {"queueing": "lifo"}}, "[pool] queueing: must be swap-aware or fifo, not 'lifo'"),
        ({"pool": {"min_residency": "-1s"}}, "[pool] min_residency: must be 0 or more"),
        ({"pool": {"min_residency": "soon"}}, "[pool] min_residency: not a duration"),
        ({"model:a": {"path": "/etc/hostname", "request_timeout": "-1s"}}, "[model:a] request_timeout: must be 0"),
    ],
)
def test_errors_name_section_and_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        structure(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_hugging_face_models_and_catalog() -> None:
    config = structure(
        {
            "model:g": {"repo": "ggml-org/gemma-3-270m-GGUF", "quant": "Q8_0", "revision": "v1", "mmproj": "mmproj-*"},
            "model:s": {"repo": "unsloth/Qwen3-0.6B-GGUF", "file": "*UD-Q4_K_XL*.gguf"},
            "catalog": {"allow_hf": "yes", "allow_repos": "ggml-org/*, unsloth/*"},
        }
    )
    g = config.models["g"]
    assert (g.repo, g.quant, g.revision, g.mmproj, g.path, g.file) == (
        "ggml-org/gemma-3-270m-GGUF", "Q8_0", "v1", "mmproj-*", None, None
    )
    assert config.models["s"].file == "*UD-Q4_K_XL*.gguf"
    assert config.catalog.allow_hf is True
    assert config.catalog.allow_repos == ("ggml-org/*", "unsloth/*")
    defaults = structure({})
    assert defaults.catalog.allow_hf is False
    assert defaults.catalog.allow_repos == ("*",)
def test_ollama_upstream_model() -> None:
    config = structure(
        {"model:up": {"backend": "ollama", "url": "http://gpu-box:11434", "upstream_model": "llama3.2:3b"}}
    )
    model = config.models["up"]
    assert (model.backend, model.url, model.upstream_model, model.path) == (
        "ollama",
        "http://gpu-box:11434",
        "llama3.2:3b",
        None,
    )
    assert structure({"model:up": {"backend": "ollama", "url": "https://h"}}).models["up"].upstream_model is None


def test_cli_config_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    ini = tmp_path / "proxy.ini"
    ini.write_text("[pool]\nsize = lots\n")
    result = subprocess.run(
        [sys.executable, "-m", "smart_proxy", "--config", str(ini)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "smart-proxy: [pool] size: invalid value, expected int"
    assert "Traceback" not in result.stderr


def test_cli_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    ini = tmp_path / "proxy.ini"
    ini.write_text("[pool]\nllama_server = /nonexistent/llama-server\n")
    result = subprocess.run(
        [sys.executable, "-m", "smart_proxy", "--config", str(ini)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "[pool] llama_server: /nonexistent/llama-server is not an executable file" in result.stderr
    assert "Traceback" not in result.stderr


def test_memory_keys(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    pool = structure({}).pool
    assert (pool.memory, pool.memory_reserve) == (AUTO_MEMORY, 1024**3)
    for text, budget in (("auto", AUTO_MEMORY), ("off", 0), ("0", 0), ("12GiB", 12 * 1024**3), (" 512m ", 512 * 1024**2)):
        assert structure({"pool": {"memory": text}}).pool.memory == budget
    assert structure({"pool": {"memory_reserve": "2g"}}).pool.memory_reserve == 2 * 1024**3
    model = structure(
        {"model:m": {"path": "m.gguf", "memory": "1TiB", "pin": "true", "priority": "-3"}}, base_dir=str(tmp_path)
    ).models["m"]
    assert (model.memory, model.pin, model.priority) == (1024**4, True, -3)
    plain = structure({"model:m": {"path": "m.gguf"}}, base_dir=str(tmp_path)).models["m"]
    assert (plain.memory, plain.pin, plain.priority) == (None, False, 0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"pool": {"memory": "lots"}}, "[pool] memory: not auto, off or a size: 'lots'"),
        ({"pool": {"memory_reserve": "-1g"}}, "[pool] memory_reserve: not a size"),
        ({"model:m": {"path": "m.gguf", "memory": "0"}}, "[model:m] memory: must be at least 1 byte"),
        ({"model:m": {"path": "m.gguf", "priority": "high"}}, "[model:m] priority: invalid value"),
        ({"model:o": {"backend": "ollama", "url": "http://h:1", "pin": "true"}}, "[model:o] pin: only for backend = llama"),
    ],
)
def test_memory_key_errors(tmp_path: Path, raw: dict, message: str) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError) as info:
        structure(raw, base_dir=str(tmp_path))
    assert message in str(info.value)


def test_gpu_keys(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    pool = structure({}).pool
    assert (pool.gpus, pool.gpu_reserve, pool.allow_partial) == ("auto", 512 * 1024**2, False)
    assert gpu_setting(pool) == "auto"
    for text in ("none", "off", "NONE", ""):
        assert gpu_setting(structure({"pool": {"gpus": text}}).pool) == "none"
    declared = structure({"pool": {"gpus": "0:24GiB, 1:24GiB", "allow_partial": "yes", "gpu_reserve": "1g"}}).pool
    assert gpu_setting(declared) == ((0, 24 * 1024**3), (1, 24 * 1024**3))
    assert (declared.allow_partial, declared.gpu_reserve) == (True, 1024**3)
    assert gpu_setting(structure({"pool": {"gpus": "3:512MB,"}}).pool) == ((3, 512 * 1024**2),)
    model = structure(
        {"model:m": {"path": "m.gguf", "allow_partial": "true", "layers": "80"}}, base_dir=str(tmp_path)
    ).models["m"]
    assert (model.allow_partial, model.layers) == (True, 80)
    plain = structure({"model:m": {"path": "m.gguf"}}, base_dir=str(tmp_path)).models["m"]
    assert (plain.allow_partial, plain.layers) == (None, None)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"pool": {"gpus": "all"}}, "[pool] gpus: not a GPU: 'all' (use auto, none, or INDEX:SIZE, e.g. 0:24GiB, 1:24GiB)"),
        ({"pool": {"gpus": "0:24GiB 1:24GiB"}}, "[pool] gpus: not a size for GPU 0: '24GiB 1:24GiB'"),
        ({"pool": {"gpus": "0:lots"}}, "[pool] gpus: not a size for GPU 0: 'lots'"),
        ({"pool": {"gpus": "0:8g, 0:8g"}}, "[pool] gpus: a GPU index is given twice in '0:8g, 0:8g'"),
        ({"pool": {"gpus": "-1:8g"}}, "[pool] gpus: not a GPU: '-1:8g'"),
        ({"pool": {"gpus": "0:0"}}, "[pool] gpus: GPU 0 has no memory: '0:0'"),
        ({"pool": {"gpus": ","}}, "[pool] gpus: no GPU in ','"),
        ({"pool": {"allow_partial": "maybe"}}, "[pool] allow_partial: not a boolean: 'maybe'"),
        ({"pool": {"gpu_reserve": "some"}}, "[pool] gpu_reserve: not a size"),
        ({"model:m": {"path": "m.gguf", "layers": "0"}}, "[model:m] layers: must be at least 1"),
        (
            {"model:o": {"backend": "ollama", "url": "http://h:1", "allow_partial": "true"}},
            "[model:o] allow_partial: only for backend = llama",
        ),
    ],
)
def test_gpu_key_errors(tmp_path: Path, raw: dict, message: str) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError) as info:
        structure(raw, base_dir=str(tmp_path))
    assert message in str(info.value)


def test_peer_sections() -> None:
    config = structure(
        {
            "peer:gpu": {"url": "http://10.0.0.2:8080", "api_key": "sk-secret", "models": "qwen3:8b, gemma", "weight": "2"},
            "peer:box": {"url": "https://box:11434", "kind": "ollama", "refresh": "2s", "cooldown": "1s"},
        }
    )
    gpu, box = config.peers["gpu"], config.peers["box"]
    assert (gpu.kind, gpu.models, gpu.weight, gpu.api_key) == ("smart-proxy", ("qwen3:8b", "gemma"), 2.0, "sk-secret")
    assert (box.kind, box.models, box.refresh, box.cooldown, box.failures) == ("ollama", ("*",), 2.0, 1.0, 2)
    assert gpu.serves("gemma:latest") and gpu.serves("qwen3:8b") and not gpu.serves("qwen3:4b")
    assert box.serves("anything:7b")
    assert "sk-secret" not in repr(gpu) and "sk-secret" not in repr(config)  # the key is never shown


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"peer:": {"url": "http://h"}}, "[peer:]: a peer section needs a name"),
        ({"peer:a": {}}, "[peer:a] url: required key missing"),
        ({"peer:a": {"url": "h:8080"}}, "[peer:a] url: 'h:8080' is not an http://"),
        ({"peer:a": {"url": "http://h", "kind": "vllm"}}, "[peer:a] kind: must be one of smart-proxy, ollama, openai"),
        ({"peer:a": {"url": "http://h", "weight": "0"}}, "[peer:a] weight: must be more than 0"),
        ({"peer:a": {"url": "http://h", "weight": "nan"}}, "[peer:a] weight: must be more than 0"),
        ({"peer:a": {"url": "http://h", "weight": "heavy"}}, "[peer:a] weight: not a number: 'heavy'"),
        ({"peer:a": {"url": "http://h", "failures": "0"}}, "[peer:a] failures: must be at least 1"),
        ({"peer:a": {"url": "http://h", "refresh": "0"}}, "[peer:a] refresh: must be more than 0"),
        ({"peer:a": {"url": "http://h", "models": ""}}, "[peer:a] models: give * (every model the peer has) or names"),
        ({"peer:a": {"url": "http://h", "colour": "red"}}, "[peer:a] colour: unknown key"),
    ],
)
def test_peer_errors_name_section_and_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        structure(raw)
    assert message in str(caught.value)
