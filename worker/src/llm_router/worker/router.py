"""The chain itself: try each model in turn, keep the first acceptable answer.

Queue-agnostic: the arq job is a thin wrapper, and a service can use
:class:`Router` in-process exactly as it used the seed's ``LLMRouter``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal, NamedTuple

import structlog
from jsonschema.protocols import Validator
from redis.asyncio import Redis

from llm_router.client.client import MessagesLike, RouteFailed, build_request
from llm_router.client.protocol import (
    BATCH_CHAIN,
    DEFAULT_CHAIN,
    Attempt,
    Outcome,
    RouteRequest,
    RouteResult,
    now_ms,
)
from llm_router.client.schemas import CompiledSchema, InvalidSchemaError, compile_schema
from llm_router.worker.batch_wire import reply_of, request_params
from llm_router.worker.batches import MessageBatches
from llm_router.worker.breaker import Breakers
from llm_router.worker.breaker import Verdict as Health
from llm_router.worker.budgets import Hold, Ledger
from llm_router.worker.cache import ResponseCache
from llm_router.worker.calls import (
    ModelCallError,
    call_model,
    max_output_tokens,
    register_local_models,
)
from llm_router.worker.capacity import Capacity
from llm_router.worker.checks import AnswerChecks, RefusalDetector, Verdict
from llm_router.worker.control import Control
from llm_router.worker.costs import Usage, worst_case_batch_usd, worst_case_usd
from llm_router.worker.deployments import Deployments, NoServer
from llm_router.worker.lanes import LaneKind
from llm_router.worker.metrics import Metrics
from llm_router.worker.offload import Offload
from llm_router.worker.parked import PARK_KEEP_MS, ParkedJob, ParkOrder
from llm_router.worker.settings import ModelConfig, Settings, server_of
from llm_router.worker.warmup import Warmer, note_load
from llm_router.worker.windows import Prompt, Windows

log = structlog.get_logger("llm_router")

#: A schema whose inlined form is larger than this is not sent to the models (they
#: still must answer JSON that fits it): litellm inlines ``$ref`` for some providers,
#: in the worker's event loop, and sends the result along.
MAX_INLINED_NODES = 20_000


def invalid_result(
    error: str, request: RouteRequest | None = None, job_id: str | None = None
) -> RouteResult:
    return RouteResult(
        status="invalid_request",
        error=error,
        job_id=job_id,
        context=request.context if request else None,
        chain=request.chain if request else None,
    )


CANCELLED_BEFORE = "cancelled: its producer cancelled the job before a model was called"
CANCELLED_WHILE = "cancelled: its producer cancelled the job while a model ran"
#: The reason of the attempt whose call a cancel abandoned.
ABANDONED = "Cancelled: the call was abandoned when the job was cancelled"
EXPIRED_BEFORE = "expired: the job's deadline passed before a model was called"
EXPIRED_WHILE = "expired: the job's deadline passed; no further model was started"


def stopped_result(
    status: Literal["expired", "cancelled"],
    error: str,
    request: RouteRequest,
    job_id: str | None,
    attempts: list[Attempt] | None = None,
    since: float | None = None,
) -> RouteResult:
    """A job ended by its deadline or its producer, with the attempts made until then."""
    return RouteResult(
        status=status,
        attempts=attempts or [],
        latency_ms=_ms_since(since) if since is not None else 0,
        error=error,
        job_id=job_id,
        context=request.context,
        chain=request.chain,
    )


class Tried(NamedTuple):
    """What one model of the chain gave: its verdict, and how the call went."""

    verdict: Verdict
    text: str = ""
    load_ms: int | None = None
    retries: int = 0
    retry_error: str | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    #: The server called (``server_of`` its api_base); None: none was.
    server: str | None = None
    #: The Message Batch that answered; None: a real-time call.
    batch_id: str | None = None


class ToPark(NamedTuple):
    """The step answers through a Message Batch: the job is to be parked with this
    request, and the budget hold it took."""

    params: dict[str, Any]
    hold: Hold


def _usage_fields(usage: Usage | None) -> dict[str, Any]:
    if usage is None:
        return {}
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cost_usd": usage.cost_usd,
    }


def _ms_since(start: float) -> int:
    return round((time.monotonic() - start) * 1000)


class Router:
    """Route chat requests through a local-first chain of models."""

    def __init__(self, settings: Settings | None = None, *, redis: Redis | None = None) -> None:
        self.settings = settings or Settings()
        self.chains: dict[str, list[ModelConfig]] = self.settings.chains
        self.refusals = RefusalDetector(self.settings.refusal_patterns)
        self.offload = Offload()
        self.checks = AnswerChecks(self.refusals, self.settings.answer_limits, self.offload)
        self.metrics = Metrics(redis, channel=self.settings.metrics_channel)
        self.breakers = Breakers(redis)
        self.capacity = Capacity(redis)
        self.deployments = Deployments(self.breakers, self.capacity)
        self.ledger = Ledger(redis, self.settings.budgets)
        self.windows = Windows(self.settings.anthropic_max_tokens)
        self.warmer = Warmer(self.windows)
        self.cache = ResponseCache(redis, defaults=self.settings.cache_ttl, offload=self.offload)
        #: Only a worker (with Redis) parks jobs; in-process, batch_api models answer live.
        self.batches: MessageBatches | None = None
        if redis is not None and any(m.batch_api for m in self._steps):
            self.batches = MessageBatches(redis, self.settings)
        register_local_models(self.models)

    @property
    def _steps(self) -> list[ModelConfig]:
        return [m for chain in self.chains.values() for m in chain]

    @property
    def models(self) -> list[ModelConfig]:
        """Every server of every step: a model with deployments is one per deployment."""
        return self.deployments.every_server(self._steps)

    def breaker_states(self, chain: str | None) -> dict[str, str]:
        """Each model (each deployment) of the chain and its breaker, as this process last
        saw it."""
        servers = self.deployments.every_server(self.chains.get(chain or "", []))
        return {m.label: self.breakers.seen.get(m.label, "closed") for m in servers}

    async def aclose(self) -> None:
        if self.batches is not None:
            await self.batches.aclose()
        await self.warmer.aclose()
        await self.capacity.aclose()
        await self.metrics.aclose()
        self.offload.close()

    async def route(
        self,
        messages: MessagesLike,
        schema: dict[str, Any] | None = None,
        context: str | None = None,
        *,
        chain: str | None = None,
    ) -> RouteResult:
        """The seed's call: the first acceptable answer, or :class:`RouteFailed`."""
        try:
            request = build_request(messages, schema=schema, context=context, chain=chain)
        except ValueError as exc:
            raise RouteFailed(invalid_result(str(exc))) from None
        result = await self.run(request)
        if not result.ok:
            raise RouteFailed(result)
        return result

    def chain_for(self, request: RouteRequest, lane: LaneKind = "interactive") -> str:
        """The request's chain, else the lane's: ``batch`` for batch work if configured."""
        if request.chain is not None:
            return request.chain
        return BATCH_CHAIN if lane == "batch" and BATCH_CHAIN in self.chains else DEFAULT_CHAIN

    async def run(
        self,
        request: RouteRequest,
        *,
        job_id: str | None = None,
        record: bool = True,
        lane: LaneKind = "interactive",
        control: Control | None = None,
    ) -> RouteResult:
        """Walk the chain for a validated request; never raises for a model's failure.

        ``record=False`` leaves the metrics to the caller (``self.metrics.record``):
        the daemon records them once the result is on its way to the producer. Batch
        work waits behind interactive work for a model's capacity. ``control``: past its
        deadline no further model is started (``expired``); cancelled, the model call
        is abandoned (``cancelled``). Nothing is parked: ``batch_api`` models answer
        in real time (the worker's jobs use :meth:`run_job`).
        """
        result = await self.run_job(
            request, job_id=job_id, record=record, lane=lane, control=control, park=False
        )
        if isinstance(result, ParkOrder):  # pragma: no cover - park=False never parks
            raise AssertionError("a job was parked by run()")
        return result

    async def run_job(
        self,
        request: RouteRequest,
        *,
        job_id: str | None = None,
        record: bool = True,
        lane: LaneKind = "interactive",
        control: Control | None = None,
        resume: ParkedJob | None = None,
        park: bool = True,
    ) -> RouteResult | ParkOrder:
        """:meth:`run` for a queued job: a batch-lane job that reaches a ``batch_api``
        model comes back as a :class:`ParkOrder` (to be parked until its batch answers;
        ``park=False``: never), and ``resume`` carries it on from that model with the
        batch's answer."""
        if request.chain is None:
            request = request.model_copy(update={"chain": self.chain_for(request, lane)})
        bound = log.bind(job_id=job_id, context=request.context, chain=request.chain)
        start = time.perf_counter()
        entry = await self.cache.entry(request, self.chains)  # None: not cached
        result: RouteResult | ParkOrder | None = None
        if resume is None:  # a resumed job was looked up before it was parked
            result = await self.cache.answer(entry, request, job_id)
        if result is None:
            result = await self._walk(
                request, job_id, bound, lane, control or Control(), resume, park
            )
        if isinstance(result, ParkOrder):
            bound.info("parked", model=result.model, position=result.position + 1)
            return result
        result.chain_ms = round((time.perf_counter() - start) * 1000, 3)
        result.cost_usd = round(sum(a.cost_usd for a in result.attempts), 10)
        result.metadata = request.metadata  # returned as given, so batch callers can match
        await self.cache.put(entry, result)  # only ok answers are kept, never a cached one
        extra = {"error": result.error} if result.status == "invalid_request" else {}
        bound.info(
            "routed",
            status=result.status,
            model_used=result.model_used,
            tries=len(result.attempts),
            latency_ms=result.latency_ms,
            **extra,
        )
        if record:
            await self.metrics.record(result, self.breaker_states(request.chain))
        return result

    async def _walk(
        self,
        request: RouteRequest,
        job_id: str | None,
        bound: structlog.typing.FilteringBoundLogger,
        lane: LaneKind,
        control: Control,
        resume: ParkedJob | None = None,
        park: bool = False,
    ) -> RouteResult | ParkOrder:
        started_ms = resume.started_ms if resume is not None else now_ms()
        start = time.monotonic() - (now_ms() - started_ms) / 1000
        models = self.chains.get(request.chain or DEFAULT_CHAIN)
        if models is None:
            known = ", ".join(sorted(self.chains))
            return invalid_result(
                f"unknown chain {request.chain!r} (known: {known})", request, job_id
            )
        schema = request.json_schema
        compiled: CompiledSchema | None = None
        try:
            if schema is not None:
                compiled = compile_schema(schema, self.settings.schema_limits)
        except InvalidSchemaError as exc:
            return invalid_result(str(exc), request, job_id)
        validator = compiled.validator if compiled is not None else None
        if compiled is not None and compiled.inlined_nodes > MAX_INLINED_NODES:
            bound.info("schema_not_sent", inlined_nodes=compiled.inlined_nodes)
            schema = None
        messages = [m.model_dump(mode="json") for m in request.messages]
        prompt = Prompt(messages, self.offload)
        attempts: list[Attempt] = list(resume.attempts) if resume is not None else []
        first = resume.position if resume is not None else 0
        if resume is not None and not (
            first < len(models) and models[first].label == resume.model
        ):  # the chain changed while the job was parked: start it again
            bound.warning("parked_chain_changed", model=resume.model)
            resume, first, attempts = None, 0, []
        for position, cfg in enumerate(models[first:], start=first + 1):
            if control.expired():  # the caller has gone: no further model, no further cost
                why = EXPIRED_BEFORE if not attempts else EXPIRED_WHILE
                return stopped_result("expired", why, request, job_id, attempts, start)
            attempt_start = time.monotonic()
            tried: Tried | ToPark
            try:
                if resume is not None and position == first + 1:
                    attempt_start -= (now_ms() - resume.parked_ms) / 1000
                    tried = await self._from_batch(cfg, resume, validator)
                else:
                    tried = await self._try(
                        cfg, request.chain or DEFAULT_CHAIN, prompt, schema, validator, lane, park
                    )
                if isinstance(tried, ToPark):
                    return ParkOrder(cfg.label, position - 1, attempts, tried.params,
                                     tried.hold, started_ms)  # fmt: skip
            except asyncio.CancelledError:
                if not control.swallow_cancel():
                    raise  # the worker is stopping: the job goes back to the queue
                abandoned = Attempt(
                    model=cfg.model,
                    outcome="rejected",
                    reason=ABANDONED,
                    latency_ms=_ms_since(attempt_start),
                )
                why = CANCELLED_WHILE
                return stopped_result(
                    "cancelled", why, request, job_id, [*attempts, abandoned], start
                )
            verdict, text = tried.verdict, tried.text
            content, outcome, reason = verdict.content, verdict.outcome, verdict.reason
            attempt = Attempt(
                model=cfg.model,
                outcome=outcome,
                reason=reason,
                latency_ms=_ms_since(attempt_start),
                load_ms=tried.load_ms,
                retries=tried.retries,
                retry_error=tried.retry_error,
                finish_reason=tried.finish_reason,
                deployment=tried.server or None,
                batch_id=tried.batch_id,
                **_usage_fields(tried.usage),
            )
            attempts.append(attempt)
            bound.info(
                "attempt",
                model=cfg.model,
                position=f"{position}/{len(models)}",
                outcome=outcome,
                reason=reason,
                latency_ms=attempt.latency_ms,
            )
            if outcome == "success":
                return RouteResult(
                    status="ok",
                    content=content,
                    raw_text=text,
                    model_used=cfg.model,
                    attempts=attempts,
                    latency_ms=_ms_since(start),
                    job_id=job_id,
                    context=request.context,
                    chain=request.chain,
                )
        return RouteResult(
            status="failed",
            attempts=attempts,
            latency_ms=_ms_since(start),
            error=f"all {len(models)} models in chain {request.chain!r} failed",
            job_id=job_id,
            context=request.context,
            chain=request.chain,
        )

    async def _try(
        self,
        step: ModelConfig,
        chain: str,
        prompt: Prompt,
        schema: dict[str, Any] | None,
        validator: Validator | None,
        lane: LaneKind,
        park: bool = False,
    ) -> Tried | ToPark:
        """One step: does the prompt fit (a server of) it, its budget, a server whose
        breaker admits it with a slot, the call under its deadline, the checks; what the
        call used is counted whatever came of it. A batch-lane job at a ``batch_api``
        model holds its budget and is to be parked instead."""
        servers = self.deployments.servers(step)
        fits, misfits = [], []
        for cfg, weight in servers:
            misfit = await self.windows.misfit(cfg, prompt)
            if misfit is None:
                fits.append((cfg, weight))
            else:
                misfits.append(misfit)
        if not fits:
            return Tried(Verdict(None, "skipped", misfits[0]))
        messages = prompt.messages
        batch = park and self.batches is not None and lane == "batch" and step.batch_api
        hold = await self._hold(step, chain, messages, schema, batch=batch)
        if isinstance(hold, str):
            return Tried(Verdict(None, "skipped", hold))
        if batch:  # the request is what its Message Batch will send
            out = max_output_tokens(step, self.settings.anthropic_max_tokens)
            return ToPark(request_params(step, messages, schema, out), hold)
        tried: Tried | None = None
        try:
            tried = await self._admitted(step, fits, messages, schema, validator, lane)
        finally:
            await self.ledger.settle(hold, step, tried.usage if tried else None)
        return tried

    async def _hold(
        self,
        step: ModelConfig,
        chain: str,
        messages: list[dict[str, Any]],
        schema: dict[str, Any] | None,
        *,
        batch: bool,
    ) -> Hold | str:
        """Room in a capped chain's budget for the call's worst case, or why not. A parked
        request's is at the batch price, held until its batch has surely ended."""
        worst = 0.0
        if self.ledger.capped(chain, step):
            prompt_bytes = len(json.dumps([messages, schema], ensure_ascii=False).encode())
            out = max_output_tokens(step, self.settings.anthropic_max_tokens)
            bound = worst_case_batch_usd if batch else worst_case_usd
            worst = bound(step.model, prompt_bytes, out)
        return await self.ledger.hold(
            chain, step, worst, wait_s=self.settings.budget_wait,
            hold_s=PARK_KEEP_MS / 1000 if batch else None,
        )  # fmt: skip

    async def _from_batch(
        self, cfg: ModelConfig, parked: ParkedJob, validator: Validator | None
    ) -> Tried:
        """The parked step's answer, from its batch result: settled, then judged like any
        answer; a request the batch did not answer is rejected (the chain goes on)."""
        server = server_of(cfg.api_base)
        out = max_output_tokens(cfg, self.settings.anthropic_max_tokens)
        try:
            reply = reply_of(cfg, parked, out)
        except ModelCallError as exc:
            await self.ledger.settle(parked.hold, cfg, None)
            return Tried(Verdict(None, "rejected", exc.reason), server=server,
                         batch_id=parked.batch_id)  # fmt: skip
        await self.ledger.settle(parked.hold, cfg, reply.usage)
        verdict = await self.checks.judge(reply.text, validator, reply.finish)
        return Tried(verdict, reply.text, usage=reply.usage, finish_reason=reply.finish.word,
                     server=server, batch_id=parked.batch_id)  # fmt: skip

    async def settle_parked(self, parked: ParkedJob) -> None:
        """A parked job that ends without its answer being used (cancelled, expired):
        what its batch request cost is counted, and its hold released."""
        cfg = self.batches.models.get(parked.model) if self.batches is not None else None
        if cfg is None:
            return
        try:
            usage = reply_of(cfg, parked, self.settings.anthropic_max_tokens).usage
        except ModelCallError:
            usage = None
        await self.ledger.settle(parked.hold, cfg, usage)

    async def _admitted(
        self,
        step: ModelConfig,
        servers: list[tuple[ModelConfig, float]],
        messages: list[dict[str, Any]],
        schema: dict[str, Any] | None,
        validator: Validator | None,
        lane: LaneKind,
    ) -> Tried:
        remaining = list(servers)
        while True:
            order = self.deployments.order(remaining)
            chosen = await self.deployments.choose(
                order, batch=lane == "batch", max_wait=step.max_wait
            )
            if isinstance(chosen, NoServer):
                return Tried(Verdict(None, "skipped", chosen.reason))
            cfg, slot, server = chosen.cfg, chosen.slot, server_of(chosen.cfg.api_base)
            failed: ModelCallError | None = None
            self.deployments.running[cfg.endpoint] += 1
            try:
                reply = await call_model(
                    cfg, messages, schema, anthropic_max_tokens=self.settings.anthropic_max_tokens
                )
            except ModelCallError as exc:
                failed = exc
            finally:
                self.deployments.running[cfg.endpoint] -= 1
                if slot is not None:
                    await self.capacity.release(slot)
            if failed is None:
                break
            note_load(cfg, failed.load_ms)
            if failed.window is not None:  # the next prompt too long for it is not sent
                self.windows.learn(cfg, failed.window, "its context error")
            # Busy is load, not ill health: the breaker neither counts it nor keeps a probe.
            health: Health = "unwell" if failed.unwell else "healthy"
            if failed.busy:
                health = "abandoned"
            await self._record_health(cfg, health, chosen.probe)
            remaining = [(c, w) for c, w in remaining if c is not cfg]
            if remaining and (failed.busy or failed.unreached):
                # Never reached, or turned away: another deployment takes it at once.
                log.info("deployment_failover", model=cfg.label, reason=failed.reason[:200])
                continue
            outcome: Outcome = "skipped" if failed.busy else "rejected"
            return Tried(
                Verdict(None, outcome, failed.reason),
                load_ms=failed.load_ms,
                retries=failed.retries,
                retry_error=failed.retry_error,
                usage=failed.usage,
                server=server,
            )
        note_load(cfg, reply.load_ms)
        # Any answer, even a refusal or a cut-off one, says the model is up.
        await self._record_health(cfg, "healthy", chosen.probe)
        verdict = await self.checks.judge(reply.text, validator, reply.finish)
        return Tried(
            verdict,
            reply.text,
            reply.load_ms,
            reply.retries,
            reply.retry_error,
            reply.usage,
            reply.finish.word,
            server,
        )

    async def _record_health(self, cfg: ModelConfig, health: Health, probe: bool) -> None:
        if await self.breakers.record(cfg, health, probe=probe) == "closed":
            self.warmer.warm([cfg])

    @property
    def default_chain(self) -> list[ModelConfig]:
        return self.chains[DEFAULT_CHAIN]
