"""Worker settings: ``LLM_ROUTER_*`` environment, then an optional TOML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from llm_router.client.protocol import (
    DEFAULT_BATCH_QUEUE,
    DEFAULT_CHAIN,
    DEFAULT_QUEUE,
    METRICS_CHANNEL,
)
from llm_router.client.schemas import CEILING, SchemaLimits
from llm_router.worker.checks import AnswerLimits
from llm_router.worker.lanes import batch_share

ENV_PREFIX = "LLM_ROUTER_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"

#: The seed's refusal list: a case-insensitive substring of any of these rejects an answer.
DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    "nie wiem",
    "I cannot",
    "I can't",
    "as an AI",
    "I don't know",
    "I'm not able",
    "I am not able",
    "I'm unable",
    "I am unable",
    "beyond my capabilities",
)

LOCAL_PROVIDERS = ("ollama", "ollama_chat")


class ModelConfig(BaseModel):
    """One link of a chain: a litellm model string and how to call it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    timeout: float = Field(gt=0, le=3600, description="hard wall-clock deadline, seconds")
    api_base: str | None = None
    api_key: SecretStr | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    structured_output: bool = Field(
        default=True, description="send the caller's schema to the model as response_format"
    )
    max_in_flight: int | None = Field(
        default=None, ge=1, description="calls in flight to this model across all workers"
    )
    max_wait: float = Field(
        default=0.0, ge=0, le=3600, description="seconds a job waits for a free slot"
    )
    keep_alive: int | str | None = Field(
        default=-1, description="Ollama keep_alive: seconds, a duration, -1 = stay loaded"
    )
    max_retries: int | None = Field(
        default=None,
        ge=0,
        le=10,
        description="retries of a transient failure within the timeout (2; local models 0)",
    )
    cache_prompt: bool = Field(
        default=False,
        description="mark the system prompt cacheable (Anthropic prompt caching)",
    )
    breaker_failures: int = Field(
        default=3, ge=1, le=1000, description="unwell failures in a row that open the breaker"
    )
    breaker_cooldown: float = Field(
        default=30.0, gt=0, le=86_400, description="seconds an open breaker skips the model"
    )
    context_window: int | None = Field(
        default=None,
        ge=256,
        le=100_000_000,
        description="tokens of prompt and answer the model takes (default: asked of Ollama, "
        "else its num_ctx or 4096; cloud models: litellm's max_input_tokens)",
    )

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else ""

    @property
    def is_local(self) -> bool:
        return self.provider in LOCAL_PROVIDERS

    @property
    def is_anthropic(self) -> bool:
        return self.provider == "anthropic" or self.model.startswith("claude")

    @property
    def output_limit(self) -> int | None:
        """The answer's token limit set in ``params``, if any."""
        for name in ("max_tokens", "max_completion_tokens", "num_predict"):
            value = self.params.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    @property
    def retries(self) -> int:
        """``max_retries``, else 2 for a cloud model and 0 for a local one: a local model's
        few slots would sit idle through the wait, and the cloud is the next link anyway."""
        if self.max_retries is not None:
            return self.max_retries
        return 0 if self.is_local else 2

    @property
    def endpoint(self) -> str:
        """The model at its server: what a breaker and capacity slots belong to."""
        return f"{self.model}@{self.api_base or ''}"

    @property
    def name(self) -> str:
        """The model's name at its provider (``qwen2.5:7b`` for ``ollama_chat/qwen2.5:7b``)."""
        return self.model.split("/", 1)[1] if "/" in self.model else self.model

    def __str__(self) -> str:
        base = f" @ {self.api_base}" if self.api_base else ""
        return f"{self.model}{base} (timeout={self.timeout}s)"


def default_chains() -> dict[str, list[ModelConfig]]:
    return {
        DEFAULT_CHAIN: [
            ModelConfig(
                model="ollama_chat/qwen2.5:7b",
                timeout=8.0,
                api_base="http://localhost:11434",
                max_in_flight=1,  # Ollama's OLLAMA_NUM_PARALLEL default
                max_wait=4.0,
            ),
            ModelConfig(model="anthropic/claude-haiku-4-5-20251001", timeout=30.0),
            ModelConfig(model="anthropic/claude-sonnet-4-6", timeout=30.0),
        ]
    }


_config_file: Path | None = None


class Settings(BaseSettings):
    """Everything the worker reads at start-up; a bad value stops it with one line."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    queue_name: str = Field(default=DEFAULT_QUEUE, min_length=1)
    max_jobs: int = Field(default=10, ge=1, le=10_000)
    keep_result: int = Field(default=3600, ge=1, description="seconds a result stays in Redis")
    batch_queue_name: str = Field(default=DEFAULT_BATCH_QUEUE, min_length=1)
    batch_max_jobs: int | None = Field(
        default=None, ge=1, le=10_000, description="job slots batch work may fill (default 4/5)"
    )
    batch_keep_result: int = Field(
        default=7 * 86_400, ge=1, description="seconds a batch result waits for its backfill"
    )
    poll_delay: float = Field(
        default=0.5, gt=0, le=60, description="safety-net poll for producers that do not wake"
    )
    chains: dict[str, list[ModelConfig]] = Field(default_factory=default_chains)
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSAL_PATTERNS))
    budgets: dict[str, float] = Field(
        default_factory=dict, description="USD per UTC day a chain's cloud models may spend"
    )
    budget_wait: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="seconds a cloud call waits while calls in flight hold its budget's rest",
    )
    anthropic_max_tokens: int = Field(default=4096, ge=1, le=64_000)
    metrics_channel: str = Field(default=METRICS_CHANNEL, min_length=1)
    metrics_port: int | None = Field(
        default=None, ge=1, le=65_535, description="serve Prometheus /metrics on this port"
    )
    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    lease_seconds: float = Field(
        default=10.0, ge=2, le=300, description="a dead worker's job is taken over after this"
    )
    max_tries: int = Field(
        default=3, ge=1, le=100, description="starts of one job before it fails as a poison job"
    )
    shutdown_grace: float = Field(
        default=30.0, ge=0, le=3600, description="on SIGTERM, how long running jobs may finish"
    )
    max_request_bytes: int = Field(default=1_000_000, ge=1024, description="a job blob's size")
    max_messages: int = Field(default=1000, ge=1)
    max_schema_bytes: int = Field(default=65_536, ge=64, le=CEILING.max_bytes)
    max_schema_depth: int = Field(
        default=32,
        ge=2,
        le=CEILING.max_depth,
        description="nesting of a schema's objects and arrays, and of its in-place ref chains",
    )
    max_answer_bytes: int = Field(default=1_000_000, ge=1024, le=64_000_000)
    max_answer_depth: int = Field(default=64, ge=1, le=128)
    max_check_seconds: float = Field(
        default=1.0, ge=0.01, le=60, description="CPU time to validate one answer"
    )
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case_insensitive(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @field_validator("chains")
    @classmethod
    def _chains_are_usable(
        cls, chains: dict[str, list[ModelConfig]]
    ) -> dict[str, list[ModelConfig]]:
        if DEFAULT_CHAIN not in chains:
            raise ValueError(f"a chain named {DEFAULT_CHAIN!r} is required")
        for name, models in chains.items():
            if not models:
                raise ValueError(f"chain {name!r} has no models")
        return chains

    @model_validator(mode="after")
    def _lanes_are_distinct(self) -> Settings:
        if self.batch_queue_name == self.queue_name:
            raise ValueError("batch_queue_name must differ from queue_name")
        return self

    @model_validator(mode="after")
    def _budgets_name_chains(self) -> Settings:
        for chain, usd in self.budgets.items():
            if chain not in self.chains:
                raise ValueError(
                    f"budget for unknown chain {chain!r} (known: {sorted(self.chains)})"
                )
            if not 0 <= usd < 1e6:
                raise ValueError(f"budget of chain {chain!r} must be between 0 and 1e6 USD a day")
        return self

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns_not_blank(cls, patterns: list[str]) -> list[str]:
        if any(not p.strip() for p in patterns):
            raise ValueError("a refusal pattern must not be blank (it would match every answer)")
        return patterns

    @property
    def batch_slots(self) -> int:
        """Job slots batch work may fill; the rest wait for interactive work."""
        return batch_share(self.max_jobs, self.batch_max_jobs)

    @property
    def schema_limits(self) -> SchemaLimits:
        return SchemaLimits(max_bytes=self.max_schema_bytes, max_depth=self.max_schema_depth)

    @property
    def answer_limits(self) -> AnswerLimits:
        return AnswerLimits(
            max_bytes=self.max_answer_bytes,
            max_depth=self.max_answer_depth,
            max_seconds=self.max_check_seconds,
        )

    @property
    def job_timeout(self) -> float:
        """Longest a job can take: every model of the longest chain waiting its longest
        for a slot (and for budget room), then running to its deadline."""
        return (
            max(
                sum(m.max_wait + m.timeout + self._budget_wait(name, m) for m in chain)
                for name, chain in self.chains.items()
            )
            + 30
        )

    def _budget_wait(self, chain: str, model: ModelConfig) -> float:
        return self.budget_wait if chain in self.budgets and not model.is_local else 0.0

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_config_file))
        return tuple(sources)


class ConfigError(Exception):
    """A setting is wrong; the message is one line that names it."""


#: Read by the client (RouterClient) on the same machine; not a worker setting.
CLIENT_ENV = {ENV_PREFIX + "PRODUCER_MODE"}


def _known_env_names() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {CONFIG_ENV} | CLIENT_ENV


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Read and check every setting; raise :class:`ConfigError` naming the bad one."""
    global _config_file
    path = config or os.environ.get(CONFIG_ENV) or None
    unknown = sorted(
        k
        for k in os.environ
        if k.upper().startswith(ENV_PREFIX) and k.upper() not in _known_env_names()
    )
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]} (known: {sorted(_known_env_names())})")
    if path is not None:
        _config_file = Path(path)
        if not _config_file.is_file():
            raise ConfigError(f"config file {path} does not exist")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"invalid setting {where}: {err['msg']}{more}") from None
    except SettingsError as exc:
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ConfigError(f"{exc}{cause}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    finally:
        _config_file = None
