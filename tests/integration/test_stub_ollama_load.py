"""The stub Ollama under load: one runner per model, a bounded queue, cold loads, Ollama's errors.

Load tests of the worker only mean something if the stub queues and serialises like piha's Ollama;
these pin that over real HTTP, with aiohttp and through litellm. Timings are lower bounds and
generous upper ones only: the machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

# First: importing calls puts litellm in offline mode before litellm itself is imported.
from llm_router.worker import calls
from llm_router.worker.settings import ModelConfig
from llm_router_testing.stubs import (
    OLLAMA_BUSY,
    OLLAMA_TOO_LONG,
    Behaviour,
    StubServer,
    answer_text,
)

litellm: Any = importlib.import_module("litellm")

pytestmark = pytest.mark.integration

QWEN = "qwen2.5:7b"
LLAMA = "llama3.1:8b"
UNKNOWN = "qwen9:1b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"
NS = 1_000_000_000


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered models are not probed with /api/show; a stray probe is refused on loopback."""
    calls.register_local_models(
        [ModelConfig(model=f"ollama_chat/{name}", timeout=5) for name in (QWEN, UNKNOWN)]
    )
    monkeypatch.setenv("OLLAMA_API_BASE", "http://127.0.0.1:9")


def chat_body(text: str = "hello", model: str = QWEN, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": False,
        **extra,
    }


async def post(
    session: aiohttp.ClientSession, stub: StubServer, body: Any, path: str = "/api/chat"
) -> tuple[int, Any]:
    async with session.post(stub.url + path, json=body) as response:
        return response.status, await response.json(content_type=None)


async def until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the stub never got there"
        await asyncio.sleep(0.01)


async def abandon(task: asyncio.Task[Any]) -> None:
    """Give up a request the way a client does: cancel it, so its connection closes."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_one_at_a_time_serialises(session: aiohttp.ClientSession) -> None:
    with StubServer(ollama_parallel=1, ollama_delay=0.2) as stub:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(post(session, stub, chat_body(f"request {i}")) for i in range(5))
        )
        elapsed = time.monotonic() - started

        assert [status for status, _ in answers] == [200] * 5
        assert elapsed >= 0.95  # five answers of 0.2 s, one after another
        assert stub.peak_in_flight == 5  # all five inside: one generating, four waiting
        assert stub.peak_generating == 1
        assert stub.served == {QWEN: 5}
        assert (stub.in_flight, stub.generating, stub.dropped, stub.rejected_busy) == (0, 0, 0, 0)
        loads = sorted(answer["load_duration"] for _, answer in answers)
        assert loads[-1] >= 0.5 * NS  # load_duration counts the wait in the queue
        assert loads[0] < loads[-1]


async def test_unlimited_by_default_and_settable_at_run_time(
    session: aiohttp.ClientSession,
) -> None:
    with StubServer() as stub:
        assert (stub.ollama_parallel, stub.ollama_delay, stub.cold_load) == (None, 0.0, 0.0)
        stub.set_ollama(delay=0.2)
        await asyncio.gather(*(post(session, stub, chat_body()) for _ in range(5)))
        assert stub.peak_generating == 5

        stub.set_ollama(parallel=1)
        stub.reset_peak()
        assert (stub.peak_in_flight, stub.peak_generating) == (0, 0)
        await asyncio.gather(*(post(session, stub, chat_body()) for _ in range(3)))
        assert (stub.peak_in_flight, stub.peak_generating) == (3, 1)

        stub.set_ollama(parallel=None, delay=0.0)
        assert (stub.ollama_parallel, stub.ollama_delay, stub.ollama_max_queue) == (None, 0.0, 512)
        assert stub.served == {QWEN: 8}
        stub.reset_counters()
        assert (stub.served, stub.peak_in_flight) == ({}, 0)
        with pytest.raises(ValueError, match="ollama_parallel"):
            stub.set_ollama(parallel=0)


async def test_raising_parallel_at_run_time_lets_a_waiter_in(
    session: aiohttp.ClientSession,
) -> None:
    with StubServer(ollama_parallel=1) as stub:
        hang = asyncio.create_task(post(session, stub, chat_body("stub:*=hang")))
        await until(lambda: stub.generating == 1)
        waiter = asyncio.create_task(post(session, stub, chat_body("let me in")))
        await until(lambda: stub.in_flight == 2)
        assert not waiter.done()

        stub.set_ollama(parallel=2)
        status, answer = await asyncio.wait_for(waiter, 3)

        assert (status, answer["message"]["content"]) == (200, f"Stub {QWEN} answers: let me in")
        assert not hang.done()
        await abandon(hang)
        await until(lambda: stub.in_flight == 0)
        assert stub.served == {QWEN: 1}  # the hanging request was never answered


async def test_full_queue_answers_ollamas_503(session: aiohttp.ClientSession) -> None:
    with StubServer(ollama_parallel=1, ollama_max_queue=2) as stub:
        hang = asyncio.create_task(post(session, stub, chat_body("stub:*=hang")))
        await until(lambda: stub.generating == 1)
        queued = [asyncio.create_task(post(session, stub, chat_body())) for _ in range(2)]
        await until(lambda: stub.in_flight == 3)

        status, answer = await post(session, stub, chat_body("one too many"))

        assert status == 503
        assert answer == {
            "error": "server busy, please try again.  maximum pending requests exceeded"
        }
        assert answer["error"] == OLLAMA_BUSY
        assert (stub.rejected_busy, stub.in_flight, stub.peak_in_flight) == (1, 3, 3)
        assert stub.requests[-1].behaviour is None  # recorded, rejected before generating
        await abandon(hang)
        assert [(await task)[0] for task in queued] == [200, 200]
        assert stub.served == {QWEN: 2}


async def test_abandoned_queued_request_is_dropped_and_never_served(
    session: aiohttp.ClientSession,
) -> None:
    with StubServer(ollama_parallel=1) as stub:
        hang = asyncio.create_task(post(session, stub, chat_body("stub:*=hang")))
        await until(lambda: stub.generating == 1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await post(session, stub, chat_body("gave up"))
        await until(lambda: stub.dropped == 1)
        assert (stub.in_flight, stub.peak_in_flight) == (1, 2)

        later = asyncio.create_task(post(session, stub, chat_body("came later")))
        await until(lambda: stub.in_flight == 2)
        await abandon(hang)  # a running request given up frees its slot too
        status, answer = await asyncio.wait_for(later, 3)

        assert (status, answer["message"]["content"]) == (200, f"Stub {QWEN} answers: came later")
        assert stub.served == {QWEN: 1}
        assert stub.dropped == 1
        await until(lambda: stub.in_flight == 0)
        assert stub.generating == 0
        assert [r.body["messages"][0]["content"] for r in stub.requests] == [
            "stub:*=hang",
            "gave up",  # seen, but never served
            "came later",
        ]


async def test_unknown_model_is_ollamas_404(session: aiohttp.ClientSession) -> None:
    with StubServer(strict_models=True, ollama_parallel=1) as stub:
        chat = await post(session, stub, chat_body(model=UNKNOWN))
        generate = await post(
            session, stub, {"model": UNKNOWN, "prompt": "hi", "stream": False}, "/api/generate"
        )
        untagged = await post(session, stub, chat_body(model="qwen2.5"))  # is qwen2.5:latest
        known = await post(session, stub, chat_body(model=QWEN))

        assert chat == (404, {"error": f"model '{UNKNOWN}' not found"})
        assert generate == (404, {"error": f"model '{UNKNOWN}' not found"})
        assert untagged == (404, {"error": "model 'qwen2.5' not found"})
        assert known[0] == 200
        assert stub.served == {QWEN: 1}
        assert stub.peak_in_flight == 1
    with StubServer() as lenient:  # the default answers any model, as the other tests rely on
        assert (await post(session, lenient, chat_body(model=UNKNOWN)))[0] == 200


@pytest.mark.usefixtures("registered")
async def test_unknown_model_through_litellm() -> None:
    with StubServer(strict_models=True) as stub:
        messages = [{"role": "user", "content": "hello"}]
        with pytest.raises(litellm.exceptions.NotFoundError, match="not found") as caught:
            await litellm.acompletion(
                model=f"ollama_chat/{UNKNOWN}", api_base=stub.url, messages=messages
            )

        assert UNKNOWN in str(caught.value)
        assert caught.value.status_code == 404
        response = await litellm.acompletion(
            model=f"ollama_chat/{QWEN}", api_base=stub.url, messages=messages
        )
        assert response.choices[0].message.content == f"Stub {QWEN} answers: hello"


async def test_cold_load_is_reported_in_load_duration(session: aiohttp.ClientSession) -> None:
    with StubServer(cold_load=0.3) as stub:
        started = time.monotonic()
        _, first = await post(session, stub, chat_body())
        assert time.monotonic() - started >= 0.29
        _, second = await post(session, stub, chat_body())
        _, other_model = await post(session, stub, chat_body(model=LLAMA))
        stub.unload(QWEN)
        _, after_unload = await post(session, stub, chat_body())
        _, warm_again = await post(session, stub, chat_body())

        assert first["load_duration"] >= 0.29 * NS  # nanoseconds, as Ollama reports them
        assert first["total_duration"] >= first["load_duration"]
        assert second["load_duration"] < 0.1 * NS
        assert other_model["load_duration"] >= 0.29 * NS  # each model loads on its own
        assert after_unload["load_duration"] >= 0.29 * NS
        assert warm_again["load_duration"] < 0.1 * NS
        assert first["done_reason"] == "stop"


async def test_load_only_requests(session: aiohttp.ClientSession) -> None:
    with StubServer(cold_load=0.2) as stub:
        started = time.monotonic()
        status, chat = await post(
            session, stub, {"model": QWEN, "messages": [], "keep_alive": "5m"}
        )
        assert time.monotonic() - started >= 0.19  # the load happens before the answer
        _, generate = await post(session, stub, {"model": LLAMA, "keep_alive": -1}, "/api/generate")

        assert status == 200
        assert chat.pop("created_at")
        assert chat == {
            "model": QWEN,
            "message": {"role": "assistant", "content": ""},
            "done_reason": "load",
            "done": True,
        }
        assert generate.pop("created_at")
        assert generate == {"model": LLAMA, "response": "", "done_reason": "load", "done": True}
        assert [(r.path, r.behaviour, r.body["keep_alive"]) for r in stub.requests] == [
            ("/api/chat", None, "5m"),
            ("/api/generate", None, -1),
        ]
        assert stub.served == {QWEN: 1, LLAMA: 1}
        _, answer = await post(session, stub, chat_body())
        assert answer["load_duration"] < 0.1 * NS  # the load-only request loaded it


async def test_length_on_the_ollama_wire(session: aiohttp.ClientSession) -> None:
    with StubServer() as stub:
        body = chat_body("stub:qwen=length tell me a long story", stream=True)
        async with session.post(stub.url + "/api/chat", json=body) as response:
            chunks = [json.loads(line) for line in (await response.text()).splitlines()]

        assert [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1]["done_reason"] == "length"
        text = "".join(c["message"]["content"] for c in chunks)
        assert text == answer_text(Behaviour.LENGTH, "qwen", body["messages"][0]["content"])


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("model", [f"ollama_chat/{QWEN}", HAIKU])
async def test_length_behaviour_through_litellm(model: str) -> None:
    user = "stub:*=length tell me a long story about queues"
    extra = {"api_key": "test-key", "max_tokens": 64} if model == HAIKU else {}
    with StubServer() as stub:
        response = await litellm.acompletion(
            model=model, api_base=stub.url, messages=[{"role": "user", "content": user}], **extra
        )

        assert response.choices[0].finish_reason == "length"
        text = response.choices[0].message.content
        assert text == answer_text(Behaviour.LENGTH, "*", user)
        assert answer_text(Behaviour.TEXT, "*", user).startswith(text)
        assert len(text) < len(answer_text(Behaviour.TEXT, "*", user))
        assert stub.requests[0].behaviour is Behaviour.LENGTH


@pytest.mark.usefixtures("registered")
async def test_litellm_calls_queue_behind_one_runner() -> None:
    with StubServer(ollama_parallel=1, ollama_delay=0.2) as stub:
        started = time.monotonic()
        responses = await asyncio.gather(
            *(
                litellm.acompletion(
                    model=f"ollama_chat/{QWEN}",
                    api_base=stub.url,
                    messages=[{"role": "user", "content": f"call {i}"}],
                )
                for i in range(3)
            )
        )

        assert time.monotonic() - started >= 0.55
        assert sorted(r.choices[0].message.content for r in responses) == [
            f"Stub {QWEN} answers: call {i}" for i in range(3)
        ]
        assert (stub.peak_generating, stub.served) == (1, {QWEN: 3})


# --- the context window, runner options and answer limits (Ollama's scheduler and truncate) ---


async def test_a_runner_reloads_for_other_runner_options_only(
    session: aiohttp.ClientSession,
) -> None:
    with StubServer(cold_load=0.3) as stub:
        _, first = await post(session, stub, chat_body(options={"num_ctx": 8192}))
        _, same = await post(session, stub, chat_body(options={"num_ctx": 8192, "seed": 1}))
        _, other = await post(session, stub, chat_body(options={"num_ctx": 2048}))

        assert first["load_duration"] >= 0.3 * NS  # cold
        assert same["load_duration"] < 0.1 * NS  # seed is not a runner option: no reload
        assert other["load_duration"] >= 0.3 * NS  # num_ctx is: loaded again
        assert stub.loads == 2


async def test_api_ps_lists_loaded_runners_with_their_context(
    session: aiohttp.ClientSession,
) -> None:
    with StubServer() as stub:
        async with session.get(stub.url + "/api/ps") as response:
            assert (await response.json())["models"] == []
        await post(session, stub, chat_body(model="qwen2.5", keep_alive=-1))
        await post(session, stub, chat_body(model=LLAMA, options={"num_ctx": 16384}))
        async with session.get(stub.url + "/api/ps") as response:
            models = {m["name"]: m for m in (await response.json())["models"]}

        assert models["qwen2.5:latest"]["context_length"] == 4096  # Ollama's smallest default
        assert models[LLAMA]["context_length"] == 16384
        assert {"model", "size", "digest", "details", "expires_at", "size_vram"} <= set(
            models[LLAMA]
        )
        assert models["qwen2.5:latest"]["expires_at"].startswith("2318")  # keep_alive -1


async def test_an_over_long_prompt_loses_its_oldest_messages_silently(
    session: aiohttp.ClientSession,
) -> None:
    """Ollama's chatPrompt: drop from the front until it fits, keep system and the last."""
    old = "Old history that no longer fits. " * 400  # about 3,300 stub tokens each
    messages = [
        {"role": "system", "content": "stub:qwen=echo"},
        {"role": "user", "content": old},
        {"role": "assistant", "content": old},
        {"role": "user", "content": "stub:qwen=echo\nthe question"},
    ]
    with StubServer() as stub:
        status, answer = await post(session, stub, chat_body(messages=messages))
        status_off, refused = await post(
            session, stub, chat_body(messages=messages, truncate=False)
        )

        assert status == 200
        assert answer["done_reason"] == "stop"
        assert answer["message"]["content"] == "the question"
        assert answer["prompt_eval_count"] <= 4096
        assert stub.truncated == 1
        assert (status_off, refused) == (400, {"error": OLLAMA_TOO_LONG})


async def test_num_predict_cuts_the_answer_and_says_length(
    session: aiohttp.ClientSession,
) -> None:
    with StubServer() as stub:
        _, cut = await post(session, stub, chat_body("a long story", options={"num_predict": 2}))
        _, whole = await post(session, stub, chat_body("a long story"))

        assert cut["done_reason"] == "length"
        assert cut["eval_count"] == 2
        assert whole["message"]["content"].startswith(cut["message"]["content"])
        assert whole["done_reason"] == "stop"


async def test_a_planned_503_is_ollamas_full_queue(session: aiohttp.ClientSession) -> None:
    with StubServer() as stub:
        body = chat_body("stub-fail:qwen=503x1 hello")
        assert await post(session, stub, body) == (503, {"error": OLLAMA_BUSY})
        status, answer = await post(session, stub, body)
        assert status == 200
        assert answer["message"]["content"].startswith("Stub")
