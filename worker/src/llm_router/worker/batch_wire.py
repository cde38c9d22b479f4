"""One batch request and its result in the Message Batches API's shapes: the request
as litellm would send the call in real time, the result as a model call's reply."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from llm_router.worker.calls import ModelCallError, Reply, cacheable_system
from llm_router.worker.checks import Finish
from llm_router.worker.costs import batch_usage
from llm_router.worker.parked import ParkedJob
from llm_router.worker.settings import ModelConfig

#: The tool litellm's JSON mode forces on Anthropic models; a batch request uses the same.
JSON_TOOL = "json_tool_call"


def _blocks(content: Any) -> Any:
    """OpenAI-style content parts as Anthropic's (text and image URLs)."""
    if not isinstance(content, list):
        return content
    out: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            out.append({k: v for k, v in part.items() if k in ("type", "text", "cache_control")})
        elif part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            out.append({"type": "image", "source": _image_source(url)})
    return out


def _image_source(url: Any) -> dict[str, Any]:
    """An inline ``data:`` image goes as base64, as litellm sends it; others by URL."""
    if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
        media_type, _, data = url[len("data:") :].partition(";base64,")
        return {"type": "base64", "media_type": media_type, "data": data}
    return {"type": "url", "url": url}


def request_params(
    cfg: ModelConfig,
    messages: list[dict[str, Any]],
    schema: dict[str, Any] | None,
    max_tokens: int,
) -> dict[str, Any]:
    """The Messages API parameters of one batch request, as litellm would send the call
    in real time: system messages as ``system``, a schema as the forced JSON tool."""
    if cfg.cache_prompt:
        messages = cacheable_system(messages)
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role == "system":
            blocks = _blocks(content)
            system += blocks if isinstance(blocks, list) else [{"type": "text", "text": blocks}]
        else:
            turns.append({"role": "assistant" if role == "assistant" else "user",
                          "content": _blocks(content)})  # fmt: skip
    params: dict[str, Any] = {"model": cfg.name, "max_tokens": max_tokens, "messages": turns}
    if system:
        params["system"] = system
    if schema is not None and cfg.structured_output and schema.get("type") == "object":
        params["tools"] = [{"name": JSON_TOOL, "input_schema": schema}]
        params["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
    params.update({k: v for k, v in cfg.params.items() if k not in ("model", "messages")})
    return params


_WORDS = {"max_tokens": "length", "refusal": "content_filter"}


def reply_of(cfg: ModelConfig, parked: ParkedJob, params_max_tokens: int) -> Reply:
    """The batch result as a model call's reply, priced at the batch price; a request the
    batch did not answer raises :class:`ModelCallError` (it falls to the next model)."""
    if parked.result is None and parked.stopped:
        raise ModelCallError("BatchAbandoned: the job stopped waiting for its batch")
    result = parked.result or {}
    kind = result.get("type")
    if kind == "errored":
        error = result.get("error")
        inner = error.get("error", error) if isinstance(error, dict) else {}
        inner = inner if isinstance(inner, dict) else {}
        raise ModelCallError(
            f"BatchErrored: {inner.get('type', 'error')}: {str(inner.get('message', ''))[:200]}"
        )
    if kind == "expired":
        raise ModelCallError("BatchExpired: the batch ended before this request was processed")
    if kind == "canceled":
        raise ModelCallError("BatchCanceled: the batch was canceled before this request ran")
    message = result.get("message")
    if kind != "succeeded" or not isinstance(message, dict):
        raise ModelCallError(f"MalformedResponse: a batch result of type {kind!r}")
    texts: list[str] = []
    for block in message.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use" and block.get("name") == JSON_TOOL:
            texts.append(json.dumps(block.get("input"), ensure_ascii=False))
    stop = message.get("stop_reason")
    stop = stop if isinstance(stop, str) else None
    details = message.get("stop_details")
    details = details if isinstance(details, dict) else {}
    finish = Finish(
        reason=_WORDS.get(stop or "", "stop"),
        provider_reason=stop,
        refusal_category=details.get("category") if stop == "refusal" else None,
        refusal_explanation=details.get("explanation") if stop == "refusal" else None,
    )
    if finish.truncated:
        finish = dataclasses.replace(finish, limit=f"max_tokens ({params_max_tokens:,})")
    usage = message.get("usage")
    counts = usage if isinstance(usage, dict) else {}
    return Reply(
        text="".join(texts).strip(),
        finish=finish,
        usage=batch_usage(cfg.model, {k: v for k, v in counts.items() if isinstance(v, int)}),
    )
