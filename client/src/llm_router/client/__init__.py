"""llm-router's producer side: enqueue routing jobs and read their results.

Light on purpose (pydantic, redis, jsonschema): a producer service does not
pull in an LLM SDK.
"""

from llm_router.client.client import JobHandle, RouteFailed, RouterClient, build_request
from llm_router.client.protocol import (
    PROTOCOL_VERSION,
    Attempt,
    Message,
    RouteRequest,
    RouteResult,
)
from llm_router.client.schemas import InvalidSchemaError, SchemaLimits
from llm_router.client.server import RedisFull

__all__ = [
    "PROTOCOL_VERSION",
    "Attempt",
    "InvalidSchemaError",
    "JobHandle",
    "Message",
    "RedisFull",
    "RouteFailed",
    "RouteRequest",
    "RouteResult",
    "RouterClient",
    "SchemaLimits",
    "build_request",
]
