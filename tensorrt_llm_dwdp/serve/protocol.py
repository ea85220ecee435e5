"""OpenAI request validation, error bodies and response shapes (pure: no I/O, no engine).

Sampling: ``temperature`` (0 or absent = greedy), ``top_p``, ``top_k``, ``min_p`` and ``seed``
(the same seed gives the same text, see ``engine/sampling.py``). A request asking for several
choices, logprobs, penalties or echo is refused with HTTP 400 and an OpenAI error body naming
the parameter, rather than served with silently different semantics.

Extensions (as in TensorRT-LLM / vLLM): ``ignore_eos``, ``stop_token_ids``,
``return_token_ids`` (adds ``token_ids`` / ``prompt_token_ids`` to each choice) and
``disaggregated_params`` (context-only / generation-only phases, see ``DisaggParams``).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An error the client sees as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(message, param=param, code=code)


@dataclass(frozen=True)
class DisaggParams:
    """The phase of a disaggregated request.

    ``context_only``: run prefill, return the first token and a one-time ``kv_url`` where the
    exported KV can be pulled. ``generation_only``: ``prompt_token_ids`` + ``first_gen_tokens``
    are already computed; pull the KV from ``kv_url`` and decode the rest.
    """

    request_type: str
    first_gen_tokens: tuple[int, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()
    kv_url: str | None = None
    ctx_request_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "request_type": self.request_type,
            "first_gen_tokens": list(self.first_gen_tokens),
            "prompt_token_ids": list(self.prompt_token_ids),
            "kv_url": self.kv_url,
            "ctx_request_id": self.ctx_request_id,
        }


@dataclass(frozen=True)
class GenerationRequest:
    """A validated completion or chat request.

    Exactly one of ``prompt`` (text), ``prompt_ids`` or ``messages`` is set. ``max_tokens``
    None means "up to the engine's max_seq_len".
    """

    kind: str  # "completion" | "chat"
    model: str | None
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] | None = None
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    return_token_ids: bool = False
    disagg: DisaggParams | None = None
    # temperature, top_p, top_k (0 = off), min_p, seed: the keyword arguments of SamplingParams.
    sampling: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


def parse_json_body(text: str | bytes) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    return body


def _int_list(param: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _bad(param, f"'{param}' must be a list of integers")
    if any(v < 0 for v in value):
        raise _bad(param, f"'{param}' holds a negative token id")
    return tuple(value)


def _number(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(key, f"'{key}' must be a number")
    if not (lo < v if lo_open else lo <= v) or not v <= hi:
        raise _bad(key, f"{key}={v} is out of range: expected {'(' if lo_open else '['}{lo}, {hi}]")
    return float(v)


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling fields as ``SamplingParams`` takes them (``top_k`` -1 or 0 = off, as vLLM)."""
    top_k = body.get("top_k")
    if top_k is None:
        top_k = 0
    elif isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise _bad("top_k", f"'top_k' must be an integer >= -1 (-1 or 0: off), got {top_k!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not -(1 << 63) <= seed < (1 << 64)):
        raise _bad("seed", f"'seed' must be a 64-bit integer, got {seed!r}")
    return {"temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "top_k": max(top_k, 0),
            "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
            "seed": seed}


def _check_supported(body: Mapping[str, Any]) -> None:
    for key in ("n", "best_of"):
        v = body.get(key)
        if v is not None and v != 1:
            raise _bad(key, f"{key}={v!r} is not supported: only one choice per request",
                       code="unsupported_value")
    for key in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        v = body.get(key)
        if v is not None and v not in (0, 0.0) and not (key == "repetition_penalty" and v == 1):
            raise _bad(key, f"{key}={v!r} is not supported", code="unsupported_value")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise _bad("logprobs", "logprobs are not supported", code="unsupported_value")
    if body.get("echo"):
        raise _bad("echo", "echo is not supported", code="unsupported_value")
    if body.get("suffix"):
        raise _bad("suffix", "suffix is not supported", code="unsupported_value")
    for key in ("tools", "functions", "response_format", "logit_bias", "guided_json"):
        if body.get(key):
            raise _bad(key, f"'{key}' is not supported", code="unsupported_value")


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "'stop' must be a non-empty string or a list of non-empty strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"'stop' holds {len(stop)} strings; at most {MAX_STOP_STRINGS}")
    return tuple(stop)


def _max_tokens(body: Mapping[str, Any], keys: tuple[str, ...], default: int | None) -> int | None:
    for key in keys:
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _bad(key, f"'{key}' must be a positive integer, got {v!r}")
        return v
    return default


def _disagg(body: Mapping[str, Any]) -> DisaggParams | None:
    d = body.get("disaggregated_params")
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _bad("disaggregated_params", "'disaggregated_params' must be an object")
    kind = d.get("request_type")
    if kind == "context_only":
        return DisaggParams("context_only")
    if kind != "generation_only":
        raise _bad("disaggregated_params.request_type",
                   f"request_type={kind!r}; expected 'context_only' or 'generation_only'")
    first = _int_list("disaggregated_params.first_gen_tokens", d.get("first_gen_tokens"))
    prompt = _int_list("disaggregated_params.prompt_token_ids", d.get("prompt_token_ids"))
    url = d.get("kv_url")
    if len(first) != 1:
        raise _bad("disaggregated_params.first_gen_tokens", "expected exactly one first token")
    if not prompt:
        raise _bad("disaggregated_params.prompt_token_ids", "empty prompt_token_ids")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise _bad("disaggregated_params.kv_url", f"kv_url={url!r} is not an http(s) URL")
    return DisaggParams("generation_only", first, prompt, url, d.get("ctx_request_id"))


def _common(body: Mapping[str, Any]) -> dict[str, Any]:
    _check_supported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "'model' must be a string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "'stream' must be a boolean")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    if opts and not stream:
        raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "'ignore_eos' must be a boolean")
    stop_ids = body.get("stop_token_ids")
    return {
        "model": model,
        "stream": stream,
        "include_usage": bool(opts.get("include_usage", False)),
        "stop": _stop(body),
        "stop_token_ids": _int_list("stop_token_ids", stop_ids) if stop_ids is not None else (),
        "ignore_eos": ignore_eos,
        "return_token_ids": bool(body.get("return_token_ids", False)),
        "disagg": _disagg(body),
        "sampling": _sampling(body),
        "raw": body,
    }


def parse_completion_request(body: Mapping[str, Any]) -> GenerationRequest:
    """Validate a ``/v1/completions`` body (one prompt: text or token ids)."""
    common = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "'prompt' is empty")
        text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        ids = _int_list("prompt", prompt)
    elif prompt is None:
        raise _bad("prompt", "'prompt' is required", code="missing_required_parameter")
    else:
        raise _bad("prompt", "'prompt' must be one string or one list of token ids "
                             "(batched prompts are not supported)")
    max_tokens = _max_tokens(body, ("max_tokens",), 16)
    return GenerationRequest(kind="completion", prompt=text, prompt_ids=ids, max_tokens=max_tokens, **common)


def parse_chat_request(body: Mapping[str, Any]) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` body (text messages only)."""
    common = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list", code="missing_required_parameter")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a string 'role'")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise _bad(f"messages[{i}].role", f"messages[{i}].role={m['role']!r} is not supported")
        out.append({"role": m["role"], "content": _message_text(i, m.get("content"))})
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), None)
    return GenerationRequest(kind="chat", messages=tuple(out), max_tokens=max_tokens, **common)


def _message_text(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")


# ---- responses ---------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(req: GenerationRequest, *, rid: str, model: str, text: str, finish_reason: str | None,
                  prompt_ids: list[int], output_ids: list[int], created: int | None = None,
                  disagg: DisaggParams | None = None) -> dict[str, Any]:
    """The non-streaming body of a finished completion or chat request."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if req.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
        choice["logprobs"] = None
    if req.return_token_ids or disagg is not None:
        choice["token_ids"] = list(output_ids)
        choice["prompt_token_ids"] = list(prompt_ids)
    if disagg is not None:
        choice["disaggregated_params"] = disagg.to_json()
    return {
        "id": rid,
        "object": "chat.completion" if req.kind == "chat" else "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(len(prompt_ids), len(output_ids)),
    }


def stream_chunk(req: GenerationRequest, *, rid: str, model: str, created: int, text: str | None,
                 finish_reason: str | None, token_ids: list[int] | None = None,
                 first: bool = False) -> dict[str, Any]:
    """One SSE chunk. For chat the first chunk carries the assistant role."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
        choice["logprobs"] = None
    if req.return_token_ids and token_ids is not None:
        choice["token_ids"] = token_ids
    return {
        "id": rid,
        "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(req: GenerationRequest, *, rid: str, model: str, created: int,
                prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (``[DONE]`` passes as a string)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")
