"""A step over several servers: how its deployments are read, named and ordered."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import SecretStr, ValidationError

from llm_router.worker.breaker import Breakers
from llm_router.worker.capacity import Capacity
from llm_router.worker.deployments import Chosen, Deployments, NoServer
from llm_router.worker.settings import ModelConfig, server_of

A, B = "http://10.0.0.1:11434", "http://10.0.0.2:11434"


def step(**fields: object) -> ModelConfig:
    return ModelConfig.model_validate({"model": "ollama_chat/q", "timeout": 8, **fields})


def test_each_deployment_is_a_server_with_its_own_settings_over_the_models() -> None:
    cfg = step(
        max_in_flight=1,
        params={"num_ctx": 4096, "temperature": 0},
        api_key="sk-model",
        deployments=[
            {"api_base": A},
            {"api_base": B, "max_in_flight": 4, "weight": 3, "params": {"num_ctx": 8192}},
        ],
    )
    (a, wa), (b, wb) = cfg.deployed()
    assert (a.api_base, a.max_in_flight, wa) == (A, 1, 1.0)
    assert (b.api_base, b.max_in_flight, wb) == (B, 4, 3.0)
    assert b.params == {"num_ctx": 8192, "temperature": 0}
    assert b.api_key == SecretStr("sk-model")
    assert a.endpoint != b.endpoint  # a breaker and slots each
    assert a.label == f"ollama_chat/q@{A}"
    plain = step(api_base=A)
    assert plain.deployed() == [(plain, 1.0)]
    assert plain.label == "ollama_chat/q"


@pytest.mark.parametrize(
    "fields",
    [
        {"api_base": A, "deployments": [{"api_base": B}]},
        {"deployments": [{"api_base": A}, {"api_base": A}]},
        {"deployments": [{"api_base": A, "weight": 0}]},
        {"deployments": [{"api_base": ""}]},
        {"deployments": [{"api_base": A, "colour": "red"}]},
    ],
)
def test_bad_deployments_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        step(**fields)


def test_a_server_is_named_without_its_credentials() -> None:
    assert server_of("http://user:s3cret@gpu.lan:8080/v1?key=k") == "http://gpu.lan:8080/v1"
    assert server_of("http://[::1]:11434") == "http://[::1]:11434"
    assert server_of(None) == ""


def test_the_least_busy_goes_first_and_equals_split_by_weight() -> None:
    cfg = step(deployments=[{"api_base": A, "weight": 3}, {"api_base": B, "weight": 1}])
    deployments = Deployments(Breakers(None), Capacity(None))
    servers = deployments.servers(cfg)
    firsts = Counter(deployments.order(servers)[0].api_base for _ in range(4000))
    assert 0.70 < firsts[A] / 4000 < 0.80  # 3:1
    a_cfg = servers[0][0]
    deployments.running[a_cfg.endpoint] = 4  # 4 calls over weight 3: busier than B's 0
    assert deployments.order(servers)[0].api_base == B


async def test_a_full_server_is_passed_over_for_one_with_a_free_slot() -> None:
    cfg = step(
        max_wait=0.2,
        deployments=[{"api_base": A, "max_in_flight": 1}, {"api_base": B, "max_in_flight": 1}],
    )
    deployments = Deployments(Breakers(None), Capacity(None))
    servers = [c for c, _ in deployments.servers(cfg)]
    first = await deployments.choose(servers, batch=False, max_wait=0.2)
    assert isinstance(first, Chosen)
    second = await deployments.choose(servers, batch=False, max_wait=0.2)
    assert isinstance(second, Chosen)
    assert {first.cfg.api_base, second.cfg.api_base} == {A, B}
    third = await deployments.choose(servers, batch=False, max_wait=0.2)
    assert isinstance(third, NoServer)
    assert third.reason.startswith("busy:")
