"""Worker settings (environment, TOML file) and ``llm-router-worker --check(-config)``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import structlog
from pydantic import SecretStr

from llm_router.client.heartbeats import Heartbeat
from llm_router.client.keys import WORKERS_KEY, heartbeat_key
from llm_router.worker.cli import main as worker_main
from llm_router.worker.logs import QUIET_AT_INFO
from llm_router.worker.settings import (
    DEFAULT_REFUSAL_PATTERNS,
    ConfigError,
    ModelConfig,
    Settings,
    load_settings,
)

SEED_MODELS = [
    "ollama_chat/qwen2.5:7b",
    "anthropic/claude-haiku-4-5-20251001",
    "anthropic/claude-sonnet-4-6",
]

TOML = """
queue_name = "from-toml"
max_jobs = 3

[[chains.default]]
model = "ollama_chat/tiny"
timeout = 2.5
api_base = "http://127.0.0.1:11434"

[[chains.default]]
model = "anthropic/claude-haiku-4-5-20251001"
timeout = 9
"""


def _chains_env(chains: dict[str, list[dict[str, Any]]]) -> str:
    return json.dumps(chains)


@pytest.fixture
def toml_file(tmp_path: Path) -> Path:
    path = tmp_path / "llm-router.toml"
    path.write_text(TOML)
    return path


def test_defaults_equal_the_seed_chain() -> None:
    settings = load_settings()
    chain = settings.chains["default"]
    assert list(settings.chains) == ["default"]
    assert [m.model for m in chain] == SEED_MODELS
    assert [m.timeout for m in chain] == [8.0, 30.0, 30.0]
    assert chain[0].api_base == "http://localhost:11434"
    assert chain[0].is_local
    assert not chain[1].is_local
    assert chain[1].provider == "anthropic"
    assert all(m.api_key is None for m in chain)
    assert settings.refusal_patterns == list(DEFAULT_REFUSAL_PATTERNS)
    assert settings.queue_name == "llm_router:queue"
    assert settings.metrics_channel == "llm_router_metrics"


def test_chains_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    chains = {
        "default": [
            {"model": "ollama_chat/small", "timeout": 3, "api_base": "http://piha:11434"},
            {"model": "anthropic/claude-sonnet-4-6", "timeout": 20, "params": {"temperature": 0}},
        ],
        "cheap": [{"model": "ollama/tiny", "timeout": 1.5, "structured_output": False}],
    }
    monkeypatch.setenv("LLM_ROUTER_CHAINS", _chains_env(chains))
    settings = load_settings()
    assert set(settings.chains) == {"default", "cheap"}
    first = settings.chains["default"][0]
    assert isinstance(first, ModelConfig)
    assert first.model == "ollama_chat/small"
    assert first.timeout == 3.0
    assert first.api_base == "http://piha:11434"
    assert settings.chains["default"][1].params == {"temperature": 0}
    cheap = settings.chains["cheap"][0]
    assert cheap.structured_output is False
    assert cheap.provider == "ollama"
    assert cheap.is_local


def test_malformed_chains_json_is_one_line_naming_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ROUTER_CHAINS", "{not json")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "chains" in message
    assert "\n" not in message


def test_missing_default_chain_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ROUTER_CHAINS", _chains_env({"other": [{"model": "x", "timeout": 1}]}))
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "chains" in message
    assert "default" in message
    assert "\n" not in message


def test_empty_chain_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    chains: dict[str, list[dict[str, Any]]] = {
        "default": [{"model": "x", "timeout": 1}],
        "spare": [],
    }
    monkeypatch.setenv("LLM_ROUTER_CHAINS", _chains_env(chains))
    with pytest.raises(ConfigError, match="chains") as info:
        load_settings()
    assert "spare" in str(info.value)


@pytest.mark.parametrize("timeout", [-1, 0])
def test_non_positive_timeout_is_refused(monkeypatch: pytest.MonkeyPatch, timeout: float) -> None:
    monkeypatch.setenv(
        "LLM_ROUTER_CHAINS", _chains_env({"default": [{"model": "x", "timeout": timeout}]})
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "chains.default.0.timeout" in str(info.value)


def test_unknown_model_field_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "LLM_ROUTER_CHAINS",
        _chains_env({"default": [{"model": "x", "timeout": 1, "timout": 2}]}),
    )
    with pytest.raises(ConfigError, match="timout"):
        load_settings()


def test_blank_refusal_pattern_is_refused() -> None:
    with pytest.raises(ConfigError, match="refusal_patterns"):
        load_settings(refusal_patterns=["I cannot", "  "])


def test_bad_scalar_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ROUTER_MAX_JOBS", "0")
    with pytest.raises(ConfigError, match="max_jobs"):
        load_settings()


def test_unknown_env_var_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ROUTER_FOO", "1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "LLM_ROUTER_FOO" in str(info.value)
    assert "\n" not in str(info.value)


def test_the_clients_producer_mode_variable_does_not_stop_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_ROUTER_PRODUCER_MODE", "1")  # one env file for both sides
    assert load_settings().queue_name == "llm_router:queue"


def test_known_scalar_env_vars_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ROUTER_QUEUE_NAME", "q2")
    monkeypatch.setenv("LLM_ROUTER_MAX_JOBS", "4")
    monkeypatch.setenv("LLM_ROUTER_POLL_DELAY", "0.01")
    settings = load_settings()
    assert settings.queue_name == "q2"
    assert settings.max_jobs == 4
    assert settings.poll_delay == pytest.approx(0.01)


def test_toml_file_by_path(toml_file: Path) -> None:
    settings = load_settings(toml_file)
    assert settings.queue_name == "from-toml"
    assert settings.max_jobs == 3
    chain = settings.chains["default"]
    assert [m.model for m in chain] == ["ollama_chat/tiny", "anthropic/claude-haiku-4-5-20251001"]
    assert chain[0].timeout == 2.5
    assert chain[0].api_base == "http://127.0.0.1:11434"


def test_toml_file_by_env(monkeypatch: pytest.MonkeyPatch, toml_file: Path) -> None:
    monkeypatch.setenv("LLM_ROUTER_CONFIG", str(toml_file))
    settings = load_settings()
    assert settings.queue_name == "from-toml"
    assert settings.chains["default"][0].model == "ollama_chat/tiny"


def test_toml_file_does_not_leak_into_later_loads(toml_file: Path) -> None:
    assert load_settings(toml_file).queue_name == "from-toml"
    assert load_settings().queue_name == "llm_router:queue"
    assert Settings().queue_name == "llm_router:queue"


def test_env_overrides_toml(monkeypatch: pytest.MonkeyPatch, toml_file: Path) -> None:
    monkeypatch.setenv("LLM_ROUTER_MAX_JOBS", "7")
    settings = load_settings(toml_file)
    assert settings.max_jobs == 7
    assert settings.queue_name == "from-toml"


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('queue_nmae = "x"\n')
    with pytest.raises(ConfigError, match="queue_nmae"):
        load_settings(path)


def test_unreadable_toml_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("queue_name = \n")
    with pytest.raises(ConfigError):
        load_settings(path)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing)
    assert str(missing) in str(info.value)


def test_missing_config_file_from_env_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LLM_ROUTER_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_api_key_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-ant-very-secret-value"
    chains = {
        "default": [{"model": "anthropic/claude-sonnet-4-6", "timeout": 5, "api_key": secret}]
    }
    monkeypatch.setenv("LLM_ROUTER_CHAINS", _chains_env(chains))
    monkeypatch.setenv("LLM_ROUTER_REDIS_URL", "redis://:hunter2pass@example:6379/0")
    settings = load_settings()
    cfg = settings.chains["default"][0]
    assert isinstance(cfg.api_key, SecretStr)
    assert cfg.api_key.get_secret_value() == secret
    assert settings.redis_url.get_secret_value() == "redis://:hunter2pass@example:6379/0"
    for text in (repr(settings), str(settings), repr(cfg), str(cfg), settings.model_dump_json()):
        assert secret not in text
        assert "hunter2pass" not in text


def test_job_timeout_covers_the_longest_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    default = load_settings()
    assert default.job_timeout >= sum(m.timeout for m in default.chains["default"])
    chains = {
        "default": [{"model": "a", "timeout": 1}],
        "slow": [{"model": "b", "timeout": 100}, {"model": "c", "timeout": 200}],
    }
    monkeypatch.setenv("LLM_ROUTER_CHAINS", _chains_env(chains))
    settings = load_settings()
    assert settings.job_timeout >= 300


def test_the_default_local_model_is_limited_and_kept_warm() -> None:
    local, *cloud = load_settings().chains["default"]
    assert (local.max_in_flight, local.max_wait, local.keep_alive) == (1, 4.0, -1)
    assert (local.breaker_failures, local.breaker_cooldown) == (3, 30.0)
    assert all(m.max_in_flight is None and m.max_wait == 0 for m in cloud)
    assert load_settings().job_timeout == 4 + 8 + 30 + 30 + 30


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_in_flight", 0), ("max_wait", -1), ("breaker_failures", 0), ("breaker_cooldown", 0)],
)
def test_local_model_settings_out_of_range_are_refused(
    monkeypatch: pytest.MonkeyPatch, field: str, value: float
) -> None:
    chains = {"default": [{"model": "ollama_chat/q", "timeout": 1, field: value}]}
    monkeypatch.setenv("LLM_ROUTER_CHAINS", _chains_env(chains))
    with pytest.raises(ConfigError, match=field):
        load_settings()


def test_model_config_str_names_model_base_and_timeout() -> None:
    cfg = ModelConfig(model="ollama_chat/q", timeout=8, api_base="http://h:1")
    assert str(cfg) == "ollama_chat/q @ http://h:1 (timeout=8.0s)"
    assert ModelConfig(model="claude-x", timeout=1).provider == ""


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures logging globally; put everything back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET_AT_INFO}
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)
    structlog.configure(**config)


@pytest.mark.usefixtures("restore_logging")
def test_cli_check_config_prints_chains(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main(["--check-config"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("default: ")
    for model in SEED_MODELS:
        assert model in lines[0]
    assert "http://localhost:11434" in lines[0]
    assert lines[0].index(SEED_MODELS[0]) < lines[0].index(SEED_MODELS[2])


@pytest.mark.usefixtures("restore_logging")
def test_cli_check_config_with_toml(capsys: pytest.CaptureFixture[str], toml_file: Path) -> None:
    assert worker_main(["--config", str(toml_file), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert "ollama_chat/tiny" in out
    assert "qwen2.5" not in out


@pytest.fixture
def fake_redis_for_cli(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeServer:
    """``--check`` connects through the client's ``_connect``: to this fake server."""
    server = fakeredis.FakeServer()
    monkeypatch.setattr(
        "llm_router.client.cli._connect",
        lambda url: fakeredis.FakeAsyncRedis(server=server),
    )
    return server


def _beat(server: fakeredis.FakeServer, queue: str, state: str = "serving") -> None:
    now = time.time()
    beat = Heartbeat(
        worker_id="w1",
        host="piha",
        pid=1,
        version="0.1.0",
        state=state,  # type: ignore[arg-type]
        started_at=now - 60,
        at=now,
        queues=[queue, queue + ":batch"],
        max_jobs=4,
        batch_max_jobs=1,
        running={queue: 2},
    )
    sync = fakeredis.FakeRedis(server=server)
    sync.set(heartbeat_key("w1"), beat.model_dump_json(), ex=15)
    sync.zadd(WORKERS_KEY, {"w1": int(now * 1000) + 15_000})


@pytest.mark.usefixtures("restore_logging")
def test_cli_check_is_unhealthy_without_a_worker(
    capsys: pytest.CaptureFixture[str], fake_redis_for_cli: fakeredis.FakeServer
) -> None:
    assert worker_main(["--check"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("default: ")  # the settings are checked first
    assert captured.err.splitlines() == [
        "llm-router-worker: unhealthy: no live worker serves queue 'llm_router:queue' "
        "(no live workers at all)"
    ]


@pytest.mark.usefixtures("restore_logging")
def test_cli_check_is_healthy_with_a_live_worker(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake_redis_for_cli: fakeredis.FakeServer,
) -> None:
    monkeypatch.setenv("LLM_ROUTER_QUEUE_NAME", "q-check")
    _beat(fake_redis_for_cli, "q-check", state="stopping")
    assert worker_main(["--check"]) == 1
    assert "(1 worker stopping)" in capsys.readouterr().err
    _beat(fake_redis_for_cli, "q-check")
    assert worker_main(["--check"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines()[-1] == "healthy: 1 worker serves 'q-check' (2 jobs running)"


@pytest.mark.usefixtures("restore_logging")
def test_cli_check_with_redis_away_is_one_line_without_the_url(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake_redis_for_cli: fakeredis.FakeServer,
) -> None:
    monkeypatch.setenv("LLM_ROUTER_REDIS_URL", "redis://:hunter2pass@127.0.0.1:6379/0")
    fake_redis_for_cli.connected = False
    assert worker_main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "llm-router-worker: unhealthy: Redis at the configured URL does not answer: ConnectionError"
    ]
    assert "hunter2pass" not in err


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LLM_ROUTER_MAX_JOBS", "0", "max_jobs"),
        ("LLM_ROUTER_CHAINS", "{not json", "chains"),
        ("LLM_ROUTER_CHAINS", '{"x": [{"model": "m", "timeout": 1}]}', "chains"),
        ("LLM_ROUTER_LOG_LEVEL", "LOUD", "log_level"),
        ("LLM_ROUTER_FOO", "1", "LLM_ROUTER_FOO"),
    ],
)
@pytest.mark.usefixtures("restore_logging")
def test_cli_check_bad_setting_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    expected: str,
) -> None:
    monkeypatch.setenv(name, value)
    assert worker_main(["--check"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("llm-router-worker: ")
    assert expected in lines[0]


@pytest.mark.usefixtures("restore_logging")
def test_cli_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert worker_main(["--config", str(missing), "--check"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert str(missing) in err[0]


def test_log_level_and_format_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ROUTER_LOG_LEVEL", "debug")
    monkeypatch.setenv("LLM_ROUTER_LOG_FORMAT", "JSON")
    settings = load_settings()
    assert settings.log_level == "DEBUG"
    assert settings.log_format == "json"


def test_unknown_lower_case_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("llm_router_max_jbos", "3")
    with pytest.raises(ConfigError, match="llm_router_max_jbos"):
        load_settings()


def test_budgets_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ROUTER_BUDGETS", '{"default": 5.0}')
    assert load_settings().budgets == {"default": 5.0}


@pytest.mark.parametrize(
    ("budgets", "says"),
    [
        ('{"nightly": 1}', "budget for unknown chain 'nightly'"),
        ('{"default": -1}', "between 0 and 1e6"),
        ('{"default": "a lot"}', "budgets.default"),
    ],
)
def test_a_bad_budget_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, budgets: str, says: str
) -> None:
    monkeypatch.setenv("LLM_ROUTER_BUDGETS", budgets)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert says in str(info.value)
    assert "\n" not in str(info.value)


def test_cache_prompt_is_a_model_field() -> None:
    chain = [{"model": "anthropic/claude-haiku-4-5-20251001", "timeout": 5, "cache_prompt": True}]
    settings = load_settings(chains={"default": chain})
    assert settings.chains["default"][0].cache_prompt is True
    assert ModelConfig(model="x", timeout=1).cache_prompt is False
