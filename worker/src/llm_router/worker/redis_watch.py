"""The worker's eye on its Redis server: eviction policy, persistence, memory.

Read at start-up and with each heartbeat (:mod:`llm_router.client.server`); a problem
(a policy that may evict jobs, a full Redis) or a caution (nothing kept on disk,
memory above 80 %) is logged when it begins and when it ends, and the last look goes
into the heartbeat and ``/metrics``, where ``llm-router status`` and ``health`` and
the alerts find it.
"""

from __future__ import annotations

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.server import ServerState, read_server

log = structlog.get_logger("llm_router.redis")


class RedisWatch:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.state = ServerState()
        self._said: set[str] = set()

    async def refresh(self) -> ServerState:
        """Look again; keep the last look while Redis is away. Never raises."""
        try:
            self.state = await read_server(self.redis)
        except (RedisError, OSError):
            return self.state
        problems, cautions = self.state.problems(), self.state.cautions()
        now = {*problems, *cautions}
        for line in problems:
            if line not in self._said:
                log.warning("redis_unfit", problem=line)
        for line in cautions:
            if line not in self._said:
                log.warning("redis_caution", caution=line)
        for line in self._said - now:
            log.info("redis_fit_again", was=line)
        self._said = now
        return self.state
