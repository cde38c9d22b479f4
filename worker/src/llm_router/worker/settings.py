"""Worker settings: ``LLM_ROUTER_*`` environment, then an optional TOML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
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

from llm_router.client.keys import DEFAULT_BATCH_QUEUE, DEFAULT_QUEUE, METRICS_CHANNEL
from llm_router.client.protocol import DEFAULT_CHAIN, MAX_CACHE_TTL_S
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


def server_of(api_base: str | None) -> str:
    """A server's address as shown in attempts, logs and status: scheme, host, port and
    path, never a password or token in its user part or query."""
    if not api_base:
        return ""
    parts = urlsplit(api_base)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: show none of it
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else api_base


class Deployment(BaseModel):
    """One server of a model that runs on several (a second GPU box beside the first)."""

    model_config = ConfigDict(extra="forbid")

    api_base: str = Field(min_length=1, description="This server's base URL")
    api_key: SecretStr | None = Field(
        default=None, description="Its key; unset: the model's. Never logged"
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Calls in flight to this server across every worker (slots in Redis); "
        "unset: the model's `max_in_flight`",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description="Its share of the calls among servers equally busy: a server of weight 3 "
        "gets three calls to another's one; and, without `max_in_flight`, how much load it "
        "takes before it counts as busier",
    )
    context_window: int | None = Field(
        default=None, ge=256, le=100_000_000, description="Its window; unset: the model's"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Applied over the model's `params` for this server"
    )


class ModelConfig(BaseModel):
    """One link of a chain: a litellm model string and how to call it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1,
        description="litellm model string: `ollama_chat/<name>` (Ollama's `/api/chat`), "
        "`anthropic/<name>`, `openai/<name>` (any OpenAI-compatible server, with `api_base`), "
        "…; `ollama/` and `ollama_chat/` models are local (see `local`)",
    )
    timeout: float = Field(
        gt=0,
        le=3600,
        description="Hard wall-clock deadline in seconds, enforced by the worker whatever the "
        "provider does; it covers the model's retries and starts once a capacity slot is held",
    )
    api_base: str | None = Field(
        default=None,
        description="The provider's base URL, e.g. `http://localhost:11434`; unset: litellm's "
        "default for the provider",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="Key for this model; unset: litellm reads the provider's variable "
        "(`ANTHROPIC_API_KEY`). Never logged",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for `litellm.acompletion`, applied last (they "
        'override the worker\'s own), e.g. `{"temperature": 0}`; a `max_tokens` or '
        "`num_predict` here is also the answer's share of the context window",
    )
    structured_output: bool | Literal["json_schema", "json_object"] = Field(
        default=True,
        description="Send the request's schema to the model as `response_format` (Ollama, "
        'llama.cpp: constrained decoding): `true` or `"json_schema"` in OpenAI\'s form, '
        '`"json_object"` as `{"type": "json_object", "schema": …}` (llama-cpp-python\'s '
        "server takes only that), `false` not at all; the answer is validated against the "
        "schema either way",
    )
    local: bool | None = Field(
        default=None,
        description="A model on your own hardware: free (cost 0), never held back by a budget, "
        "no retries unless `max_retries` says so, warmed up at start. Unset: true for "
        "`ollama/` and `ollama_chat/` models, false otherwise; set it for a llama.cpp, vLLM "
        "or LM Studio server behind `openai/<name>`",
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Calls in flight to this model across every worker process and host "
        "(slots leased in Redis); unset: unlimited",
    )
    max_wait: float = Field(
        default=0.0,
        ge=0,
        le=3600,
        description="Seconds a job waits, first come first served, for one of the "
        "`max_in_flight` slots before it moves on down the chain (`skipped`, `busy: …`)",
    )
    keep_alive: int | str | None = Field(
        default=-1,
        description="Ollama models: Ollama's `keep_alive`, sent with every call and warm-up: "
        'seconds, a duration such as `"30m"`, `-1` = stay loaded, `0` = unload after the '
        "call; JSON `null`: not sent",
    )
    max_retries: int | None = Field(
        default=None,
        ge=0,
        le=10,
        description="Retries of a transient failure (HTTP 429, 529, 500, 502, 503, 504, a "
        "connection reset) on this model, within its `timeout`; unset: 2 for a cloud model, "
        "0 for a local one",
    )
    cache_prompt: bool = Field(
        default=False,
        description="Anthropic: send the last system message as a prompt-cache breakpoint, so "
        "jobs sharing a long system prompt read it at a tenth of the input price",
    )
    breaker_failures: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Failures in a row that say the model is unwell (deadline, connection "
        "refused or reset, HTTP 5xx, 404, 401/403) and open its circuit breaker, shared by "
        "all workers",
    )
    breaker_cooldown: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        description="Seconds an open breaker skips the model before one probe request decides",
    )
    batch_api: bool = Field(
        default=False,
        description="Anthropic: jobs of the batch lane that reach this model are parked and "
        "answered through Message Batches at half the price (most within an hour, all within "
        "24 h); interactive jobs still call it in real time",
    )
    context_window: int | None = Field(
        default=None,
        ge=256,
        le=100_000_000,
        description="Tokens of prompt and answer the model takes; a prompt that does not fit "
        "skips the model (`context: …`). Unset: for Ollama, what `/api/ps` reports once the "
        "warm-up has loaded it, else `params.num_ctx`, else 4096; for cloud models, litellm's "
        "`max_input_tokens`",
    )

    #: One of a model's several deployments (set on the configs ``deployed`` makes).
    _one_of_many: bool = PrivateAttr(default=False)

    deployments: list[Deployment] = Field(
        default_factory=list,
        description="Several servers of this model, each with its own `api_base` and optional "
        "`api_key`, `max_in_flight`, `weight`, `context_window` and `params` (JSON list of "
        "objects; TOML: `[[chains.NAME.deployments]]` under the model). Each call takes a "
        "server whose breaker is not open with a free slot, the least busy first (calls in "
        "flight over its `max_in_flight`, else over its `weight`), equals by weight; when all "
        "are full it waits up to `max_wait` for the first slot on any. Breaker, slots, warm-up "
        "and window are per server. Unset: the one server at `api_base`",
    )

    @model_validator(mode="after")
    def _one_way_to_name_servers(self) -> ModelConfig:
        if self.deployments and self.api_base is not None:
            raise ValueError("give api_base or deployments, not both")
        bases = [d.api_base for d in self.deployments]
        if len(set(bases)) != len(bases):
            raise ValueError("two deployments with the same api_base")
        if self.batch_api and not self.is_anthropic:
            raise ValueError("batch_api is for Anthropic models (Message Batches)")
        if self.batch_api and self.deployments:
            raise ValueError("batch_api takes one api_base, not deployments")
        return self

    def deployed(self) -> list[tuple[ModelConfig, float]]:
        """One config per server (its address, key, slots, window and params over the
        model's) with its weight; a model without deployments is its own one server."""
        if not self.deployments:
            return [(self, 1.0)]
        out = []
        for d in self.deployments:
            one = self.model_copy(
                update={
                    "api_base": d.api_base,
                    "api_key": d.api_key or self.api_key,
                    "max_in_flight": d.max_in_flight or self.max_in_flight,
                    "context_window": d.context_window or self.context_window,
                    "params": {**self.params, **d.params},
                    "deployments": [],
                }
            )
            one._one_of_many = True
            out.append((one, d.weight))
        return out

    @property
    def label(self) -> str:
        """How status, heartbeats and metrics name it: the model, or ``model@server`` for
        one of its several deployments."""
        return f"{self.model}@{server_of(self.api_base)}" if self._one_of_many else self.model

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0] if "/" in self.model else ""

    @property
    def is_local(self) -> bool:
        return self.local if self.local is not None else self.is_ollama

    @property
    def is_ollama(self) -> bool:
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

    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis to take jobs from: `redis://`, `rediss://` (TLS) or "
        "`redis+sentinel://`. A secret: never printed or logged",
    )
    queue_name: str = Field(
        default=DEFAULT_QUEUE,
        min_length=1,
        description="The queue (a Redis sorted set) interactive jobs are taken from; "
        "producers must use the same name",
    )
    max_jobs: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description="Jobs one worker process runs at once, both queues together",
    )
    keep_result: int = Field(
        default=3600,
        ge=1,
        description="Seconds a result (`arq:result:<id>`) stays in Redis for its producer",
    )
    batch_queue_name: str = Field(
        default=DEFAULT_BATCH_QUEUE,
        min_length=1,
        description="The batch queue `llm-router backfill` fills, served after `queue_name` "
        "with the job slots interactive work leaves; must differ from `queue_name`",
    )
    batch_max_jobs: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Job slots batch work may fill (at most `max_jobs`); the rest wait for "
        "interactive jobs. Unset: `max_jobs` less a fifth of it (at least one slot less), "
        "but at least 1 (10 gives 8)",
    )
    batch_keep_result: int = Field(
        default=7 * 86_400,
        ge=1,
        description="Seconds a batch result waits in Redis for its backfill to collect it; a "
        "backfill deletes each result once its row is on disk",
    )
    failed_keep: int = Field(
        default=1000,
        ge=0,
        le=1_000_000,
        description="Jobs that ended failed or expired kept, with their request and result, "
        "for `llm-router failed` (the oldest go first; 0 keeps none). Each holds its job "
        "blob: up to max_request_bytes",
    )
    failed_keep_seconds: int = Field(
        default=7 * 86_400,
        ge=60,
        le=400 * 86_400,
        description="Seconds a failed or expired job is kept for `llm-router failed`",
    )
    poll_delay: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="Seconds between safety-net polls of the queue: our producers wake a "
        "worker at once; the poll serves producers that only write arq's keys, and finds a "
        "dead worker's jobs once their lease has lapsed. An idle worker whose polls find "
        "nothing polls at twice this",
    )
    chains: dict[str, list[ModelConfig]] = Field(
        default_factory=default_chains,
        description="Named chains, each an ordered list of models (the model fields). A "
        "chain `default` is required and none may be empty; setting `chains` replaces the "
        "built-in ones whole. JSON in the environment",
    )
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSAL_PATTERNS),
        description="An answer that contains any of these (case-insensitive substring) is "
        "rejected. Setting it replaces the list; a blank pattern is refused. JSON list in "
        "the environment",
    )
    budgets: dict[str, float] = Field(
        default_factory=dict,
        description="USD per UTC day each named chain's cloud models may spend, shared by all "
        'workers, e.g. `{"default": 5.0}` (JSON in the environment). Reached, they are '
        "skipped (`budget: …`) and local models go on; a chain without an entry is not "
        "capped, `0` turns its cloud off",
    )
    budget_wait: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="Seconds a cloud call of a capped chain waits while calls in flight hold "
        "the rest of its budget (they settle to their real cost, usually far less); a budget "
        "really spent skips at once",
    )
    cache_ttl: dict[str, int] = Field(
        default_factory=dict,
        description="Seconds each named chain keeps an `ok` answer in the response cache and "
        'answers the same request from it, e.g. `{"batch": 86400}` (JSON in the environment); '
        "a request's own `cache_ttl` wins, and a chain without an entry caches only what asks",
    )
    batch_size: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Parked requests of one model that make a Message Batch be sent at once",
    )
    batch_wait: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="Seconds the oldest parked request waits for others before its Message "
        "Batch is sent anyway",
    )
    batch_poll: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds between looks at the open Message Batches (one worker looks)",
    )
    anthropic_max_tokens: int = Field(
        default=4096,
        ge=1,
        le=64_000,
        description="`max_tokens` of every call to an `anthropic/*` or `claude*` model "
        "(litellm would ask for 64,000): the answer's share of the context window and of a "
        "budget's worst case",
    )
    metrics_channel: str = Field(
        default=METRICS_CHANNEL,
        min_length=1,
        description="Redis pub/sub channel of the per-job metrics event",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65_535,
        description="Serve Prometheus `/metrics` on this port; unset: not served",
    )
    metrics_host: str = Field(
        default="127.0.0.1", min_length=1, description="Address `/metrics` binds to"
    )
    lease_seconds: float = Field(
        default=10.0,
        ge=2,
        le=300,
        description="Seconds of the lease on a running job (`arq:in-progress:<id>`), renewed "
        "every third of it: a dead or stalled worker's job is taken over by another worker "
        "within `lease_seconds` + twice `poll_delay`",
    )
    max_tries: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Starts of one job: a job whose workers died (or stalled) this many times "
        "while running it is not run again, its next start stores a `failed` result. A "
        "hand-back on SIGTERM is not a start",
    )
    shutdown_grace: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="On SIGTERM, seconds the running jobs may still finish; what still runs "
        "then is handed back to the queue at once (as on SIGINT or a second signal). Keep "
        "systemd's `TimeoutStopSec` longer",
    )
    max_request_bytes: int = Field(
        default=1_000_000,
        ge=1024,
        description="Largest job blob (`arq:job:<id>`) in bytes; a larger one is refused "
        "(`invalid_request`) without being parsed",
    )
    max_messages: int = Field(default=1000, ge=1, description="Most messages in one request")
    max_schema_bytes: int = Field(
        default=65_536,
        ge=64,
        le=CEILING.max_bytes,
        description="Largest request `schema`, as compact UTF-8 JSON, in bytes",
    )
    max_schema_depth: int = Field(
        default=32,
        ge=2,
        le=CEILING.max_depth,
        description="Deepest nesting of a schema's objects and arrays, and longest chain of "
        "subschemas applied at one place in the answer (`$ref`, `allOf`, …)",
    )
    max_answer_bytes: int = Field(
        default=1_000_000,
        ge=1024,
        le=64_000_000,
        description="Largest answer, in bytes of UTF-8; a larger one is an `invalid` attempt "
        "(`AnswerTooLarge`)",
    )
    max_answer_depth: int = Field(
        default=64,
        ge=1,
        le=128,
        description="Deepest nesting of an answer's JSON when a schema was asked for "
        "(`AnswerNotAcceptable`)",
    )
    max_check_seconds: float = Field(
        default=1.0,
        ge=0.01,
        le=60,
        description="CPU seconds validating one answer against its schema may take; then the "
        "attempt is `invalid` (`ValidationTooCostly`)",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="`json`, `console`, or `auto`: JSON unless stderr is a terminal. Any case",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO",
        description="Any case. arq, litellm and httpx stay at WARNING or above whatever this "
        "says (their INFO lines would print prompts)",
    )

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
    def _cache_ttls_name_chains(self) -> Settings:
        for chain, ttl in self.cache_ttl.items():
            if chain not in self.chains:
                raise ValueError(
                    f"cache_ttl for unknown chain {chain!r} (known: {sorted(self.chains)})"
                )
            if not 0 <= ttl <= MAX_CACHE_TTL_S:
                raise ValueError(f"cache_ttl of chain {chain!r} must be 0 to {MAX_CACHE_TTL_S} s")
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
