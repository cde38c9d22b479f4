"""Which queue a worker claims from, how many slots batch work may fill, when to claim again."""

from __future__ import annotations

import pytest

from llm_router.client.protocol import RouteRequest
from llm_router.worker.lanes import Lanes, batch_share
from llm_router.worker.router import Router
from llm_router.worker.settings import ModelConfig, Settings, load_settings


def lanes(max_jobs: int = 10, batch_max_jobs: int = 8) -> Lanes:
    return Lanes(
        "q",
        "q:batch",
        max_jobs=max_jobs,
        batch_max_jobs=batch_max_jobs,
        keep_result_s=60,
        batch_keep_result_s=3600,
    )


def test_interactive_comes_first_and_batch_keeps_to_its_share() -> None:
    lane = lanes()
    assert lane.names == ["q", "q:batch"]
    assert lane.wants(10) == [10, 8]
    lane.queues[1].running = 8
    assert lane.wants(2) == [2, 0]  # the last two slots are interactive work's
    assert lane.wake_keys(2) == ["q:wake"]
    lane.queues[1].running = 3
    assert lane.wake_keys(2) == ["q:wake", "q:batch:wake"]


def test_a_claim_that_got_all_it_asked_for_marks_a_backlog() -> None:
    lane = lanes()
    lane.claimed([4, 4], [4, 1])
    assert lane.queues[0].backlog
    assert not lane.queues[1].backlog
    assert lane.backlog_waiting(1)
    lane.claimed([3, 0], [2, 0])  # batch was not looked at: its mark stays
    assert not lane.queues[0].backlog
    assert not lane.backlog_waiting(1)
    lane.claimed([1, 1], [0, 1])
    assert lane.backlog_waiting(1)
    lane.queues[1].running = 8  # a backlog this worker has no room for
    assert not lane.backlog_waiting(1)


def test_batch_share_defaults_to_four_fifths_and_never_all_when_it_can_help() -> None:
    assert batch_share(10) == 8
    assert batch_share(50) == 40
    assert batch_share(2) == 1
    assert batch_share(1) == 1  # one slot: nothing to keep back
    assert batch_share(10, 3) == 3
    assert lanes(max_jobs=4, batch_max_jobs=9).queues[1].max_jobs == 4


def test_settings_for_the_batch_lane() -> None:
    settings = load_settings(max_jobs=20)
    assert settings.batch_queue_name == "llm_router:batch"
    assert settings.batch_slots == 16
    assert load_settings(max_jobs=5, batch_max_jobs=9).batch_slots == 5
    assert settings.batch_keep_result == 7 * 86_400
    with pytest.raises(Exception, match="must differ from queue_name"):
        load_settings(queue_name="same", batch_queue_name="same")


def _router(*chains: str) -> Router:
    model = [ModelConfig(model="ollama_chat/x", timeout=1.0, api_base="http://127.0.0.1:9")]
    return Router(Settings(chains={name: model for name in chains}))


def test_a_request_without_a_chain_takes_its_lanes() -> None:
    request = RouteRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    with_batch = _router("default", "batch")
    assert with_batch.chain_for(request, "batch") == "batch"
    assert with_batch.chain_for(request, "interactive") == "default"
    assert _router("default").chain_for(request, "batch") == "default"
    named = request.model_copy(update={"chain": "default"})
    assert with_batch.chain_for(named, "batch") == "default"
