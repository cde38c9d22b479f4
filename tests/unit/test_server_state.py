"""What llm-router makes of its Redis server's state: unfit, worth a warning, or fine."""

from __future__ import annotations

import pytest
from redis.exceptions import OutOfMemoryError, ResponseError

from llm_router.client.server import (
    ServerState,
    best_known,
    refused_for_memory,
    summary,
)

MB = 1_048_576


def test_a_full_or_evicting_server_is_unfit_and_says_why() -> None:
    fine = ServerState("7.0.15", "noeviction", True, 100 * MB, 512 * MB)
    assert fine.problems() == []
    assert fine.cautions() == []
    full = ServerState("7.0.15", "noeviction", True, 512 * MB, 512 * MB)
    assert full.problems() == [
        "Redis is full: 512.0 MB used of maxmemory 512.0 MB; enqueues and results are "
        "refused until there is room"
    ]
    lru = ServerState("7.0.15", "allkeys-lru", True, 1 * MB, 0)
    assert len(lru.problems()) == 1
    assert "maxmemory-policy is allkeys-lru" in lru.problems()[0]
    assert not lru.full  # maxmemory 0: no limit


def test_cautions_are_no_disk_and_memory_past_80_percent() -> None:
    state = ServerState("7.0.15", "noeviction", False, 420 * MB, 512 * MB)
    assert state.problems() == []
    assert state.cautions() == [
        "Redis keeps nothing on disk: a restart loses every queued job",
        "Redis memory at 82% of maxmemory",
    ]
    unknown = ServerState("7.0.15", "noeviction", None, 1 * MB, 0)
    assert unknown.cautions() == []  # persistence unknown is not a warning


def test_what_a_worker_saw_stands_in_for_a_user_without_info() -> None:
    blind = ServerState()
    seen = ServerState("8.1.8", "volatile-lru", True, 5 * MB, 10 * MB)
    assert best_known(blind, [None, {"junk": 1}, seen.as_dict()]) == seen
    assert best_known(seen, []) == seen
    assert best_known(blind, []) == blind
    assert summary(blind) == "Redis: not readable by this user (INFO)"
    assert summary(seen) == (
        "Redis 8.1.8: maxmemory-policy volatile-lru, persistence on, 5.0 MB used of "
        "maxmemory 10.0 MB"
    )


@pytest.mark.parametrize(
    ("error", "full"),
    [
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True),
        # Redis 6.2: a write refused inside a script comes wrapped.
        (
            ResponseError(
                "Error running script (call to f_89): @user_script:40: @user_script: 40: "
                "-OOM command not allowed when used memory > 'maxmemory'."
            ),
            True,
        ),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (ConnectionError("down"), False),
    ],
)
def test_an_oom_refusal_is_known_in_both_forms(error: Exception, full: bool) -> None:
    assert refused_for_memory(error) is full
