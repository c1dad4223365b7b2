"""OpenAI wire format: parse request bodies into typed requests, render responses, chunks and errors.

Pure: no I/O and no clock reads (timestamps come in as arguments). A validation error names the
offending field, so a 400 says exactly what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.schemas import SamplingSpec

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256  # chat has no fixed default upstream; clipped to the context length
MAX_STOP_SEQUENCES = 4
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
DONE_EVENT = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.retry_after_s = param, code, retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass(frozen=True)
class CompletionRequest:
    chat: bool  # /v1/chat/completions (messages) or /v1/completions (prompt)
    model: str
    prompt: str | None
    messages: list[dict[str, Any]] | None
    sampling: SamplingSpec
    max_tokens_given: bool  # False: the default applies and is clipped to the model's context
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage


def parse_request(body: bytes, chat: bool) -> CompletionRequest:
    """Validate a request body; raise ApiError(400) naming the first offending field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "required, a non-empty string")
    _integer(data, "n", 1, 1, 1)  # only one choice per request is supported
    stream = _boolean(data, "stream", False)
    options = data.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise invalid("stream_options", "an object, allowed only with stream=true")
    include_usage = _boolean(options or {}, "include_usage", False, "stream_options.include_usage")
    max_key = "max_completion_tokens" if chat and "max_completion_tokens" in data else "max_tokens"
    default_max = CHAT_DEFAULT_MAX_TOKENS if chat else COMPLETION_DEFAULT_MAX_TOKENS
    sampling = SamplingSpec(
        max_tokens=_integer(data, max_key, default_max, 1),
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=_stop(data.get("stop")),
        seed=_integer(data, "seed", None, None),
        ignore_eos=_boolean(data, "ignore_eos", False),
    )
    return CompletionRequest(
        chat=chat, model=model,
        prompt=None if chat else _prompt(data.get("prompt")),
        messages=_messages(data.get("messages")) if chat else None,
        sampling=sampling, max_tokens_given=data.get(max_key) is not None,
        stream=stream, include_usage=include_usage,
    )


def fit_to_context(request: CompletionRequest, max_model_len: int) -> CompletionRequest:
    """Clip a defaulted max_tokens to the model's context; reject an explicit one that cannot fit."""
    if request.sampling.max_tokens <= max_model_len:
        return request
    if request.max_tokens_given:
        raise invalid("max_tokens", f"{request.sampling.max_tokens} exceeds the model's context "
                                    f"length of {max_model_len} tokens")
    sampling = request.sampling.model_copy(update={"max_tokens": max_model_len})
    return CompletionRequest(**{**request.__dict__, "sampling": sampling})


def _integer(data: dict, name: str, default: int | None, low: int | None, high: int | None = None) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, "must be an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(name, f"must be between {low} and {high}" if high is not None else f"must be >= {low}")
    return value


def _number(data: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, "must be a number")
    if value > high or value < low or (low_open and value == low):
        raise invalid(name, f"must be in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _boolean(data: dict, name: str, default: bool, label: str | None = None) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(label or name, "must be true or false")
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"at most {MAX_STOP_SEQUENCES} sequences")
    return stops


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # a batch of one prompt
    if not isinstance(value, str):
        raise invalid("prompt", "required, a string (or a list holding one string)")
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "required, a non-empty list")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(where, "must be an object")
    if message.get("role") not in CHAT_ROLES:
        raise invalid(f"{where}.role", f"must be one of {', '.join(sorted(CHAT_ROLES))}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is supported
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise invalid(f"{where}.content", "only text content parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise invalid(f"{where}.content", "must be a string or a list of text parts")
    return {"role": message["role"], "content": content}


# ---------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request: CompletionRequest, request_id: str, created_s: int, text: str,
                    finish_reason: str | None, used: dict[str, int]) -> dict[str, Any]:
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {"id": request_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": created_s, "model": request.model, "choices": [choice], "usage": used}


def chunk_body(request: CompletionRequest, request_id: str, created_s: int, text: str,
               finish_reason: str | None, first: bool) -> dict[str, Any]:
    if request.chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    body = _chunk_envelope(request, request_id, created_s, [choice])
    if request.include_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last
    return body


def usage_chunk_body(request: CompletionRequest, request_id: str, created_s: int,
                     used: dict[str, int]) -> dict[str, Any]:
    return {**_chunk_envelope(request, request_id, created_s, []), "usage": used}


def _chunk_envelope(request: CompletionRequest, request_id: str, created_s: int,
                    choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": created_s, "model": request.model, "choices": choices}


def sse_event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
