"""Fixtures for the fast unit tests: fakeredis only, no sockets, no real model calls."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import fakeredis
import pytest
from redis.asyncio import Redis


@pytest.fixture(autouse=True)
def _clean_router_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LLM_ROUTER_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("LLM_ROUTER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    """One in-memory Redis server per test; clients made from it share its data."""
    return fakeredis.FakeServer()


@pytest.fixture
async def redis(fake_server: fakeredis.FakeServer) -> AsyncIterator[Redis]:
    client: Redis = fakeredis.FakeAsyncRedis(server=fake_server)
    yield client
    await client.aclose()


@pytest.fixture
async def broken_redis() -> AsyncIterator[Redis]:
    """A Redis whose every command fails with a connection error."""
    server = fakeredis.FakeServer()
    server.connected = False
    client: Redis = fakeredis.FakeAsyncRedis(server=server)
    yield client
    await client.aclose()
