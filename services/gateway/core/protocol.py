"""OpenAI wire format: check request bodies and read what routing needs; render answers from text.

The body itself goes to the engine unchanged: vLLM's own server answers it (every parameter it
knows; unknown ones are ignored, as there). The checks here refuse early, with a 400 naming the
field, only what vLLM refuses too, and keep hostile input off the bus. Engines that answer text (the
fake and simulated ones) get their answers rendered here. Pure: no I/O and no clock reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.gateway.core.body import load_body
from services.gateway.core.errors import invalid
from shared.schemas import INT64_MAX, SamplingSpec

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256  # chat has no fixed default upstream; clipped to the context length
MAX_TOKEN_LIST = 1024  # stop_token_ids entries
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
DONE_EVENT = b"data: [DONE]\n\n"
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions",  # endpoint -> the engine's route
          "responses": "/v1/responses", "tokenize": "/tokenize", "detokenize": "/detokenize"}
STREAMING_MODEL_ROUTES = frozenset({"responses"})  # of the rest (model-only bodies), those that may stream


@dataclass(frozen=True)
class CompletionRequest:
    chat: bool  # /v1/chat/completions (messages) or /v1/completions (prompt)
    model: str
    prompt: str | None  # text engines: the prompt (a batch or token ids as their text)
    messages: list[dict[str, Any]] | None  # text engines: the messages' role and text
    sampling: SamplingSpec
    max_tokens_given: bool  # False: the default applies and is clipped to the model's context
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage
    body: bytes = b""  # the client's body, forwarded unchanged to engines that speak OpenAI


def parse_request(body: bytes, chat: bool) -> CompletionRequest:
    """Validate a request body; raise ApiError(400) naming the first offending field."""
    data = load_body(body)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "required, a non-empty string")
    _integer(data, "n", 1, 1)
    stream = _boolean(data, "stream", False)
    options = data.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise invalid("stream_options", "an object, allowed only with stream=true")
    include_usage = _boolean(options or {}, "include_usage", False, "stream_options.include_usage")
    max_key = "max_completion_tokens" if chat and data.get("max_completion_tokens") is not None else "max_tokens"
    default_max = CHAT_DEFAULT_MAX_TOKENS if chat else COMPLETION_DEFAULT_MAX_TOKENS
    sampling = SamplingSpec(
        max_tokens=_integer(data, max_key, default_max, 1),
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=_stop(data.get("stop")),
        seed=_integer(data, "seed", None, -INT64_MAX - 1),
        ignore_eos=_boolean(data, "ignore_eos", False),
        presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(data, "repetition_penalty", 1.0, 0.0, 2.0, low_open=True),
        top_k=_integer(data, "top_k", 0, -1),
        min_p=_number(data, "min_p", 0.0, 0.0, 1.0),
        min_tokens=_integer(data, "min_tokens", 0, 0),
        stop_token_ids=_token_ids(data.get("stop_token_ids")),
        logit_bias=_logit_bias(data.get("logit_bias")),
    )
    if sampling.min_tokens > sampling.max_tokens:
        raise invalid("min_tokens", f"must be at most max_tokens ({sampling.max_tokens})")
    return CompletionRequest(
        chat=chat, model=model,
        prompt=None if chat else _prompt(data.get("prompt")),
        messages=_messages(data.get("messages")) if chat else None,
        sampling=sampling, max_tokens_given=data.get(max_key) is not None,
        stream=stream, include_usage=include_usage, body=body,
    )


def parse_model_request(body: bytes, streams: bool = False) -> CompletionRequest:
    """A body whose only fields the gateway needs are `model` and (`streams`: /v1/responses) `stream`
    (/tokenize, /detokenize, /v1/responses): the engine checks the rest."""
    data = load_body(body)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "required, a non-empty string")
    return CompletionRequest(chat=False, model=model, prompt=None, messages=None, sampling=SamplingSpec(),
                             max_tokens_given=False, stream=streams and _boolean(data, "stream", False),
                             include_usage=False, body=body)


def fit_to_context(request: CompletionRequest, max_model_len: int) -> CompletionRequest:
    """Clip a defaulted max_tokens to the model's context; reject an explicit one that cannot fit."""
    if request.sampling.max_tokens <= max_model_len:
        return request
    if request.max_tokens_given:
        raise invalid("max_tokens", f"{request.sampling.max_tokens} exceeds the model's context "
                                    f"length of {max_model_len} tokens")
    sampling = request.sampling.model_copy(update={"max_tokens": max_model_len})
    return CompletionRequest(**{**request.__dict__, "sampling": sampling})


def _integer(data: dict, name: str, default: int | None, low: int, high: int = INT64_MAX) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, "must be an integer")
    if not low <= value <= high:
        raise invalid(name, f"must be between {low} and {high}")
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
    return stops


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TOKEN_LIST or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT64_MAX for t in value):
        raise invalid("stop_token_ids", f"a list of at most {MAX_TOKEN_LIST} token ids (integers >= 0)")
    return value


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise invalid("logit_bias", f"an object of at most {MAX_LOGIT_BIAS} token ids to biases")
    bias = {}
    for token, amount in value.items():
        if not (token.isascii() and token.isdigit()) or int(token) > INT64_MAX:
            raise invalid("logit_bias", f"key {token[:40]!r} is not a token id")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not -100 <= amount <= 100:
            raise invalid(f"logit_bias.{token}", "a number in [-100, 100]")
        bias[int(token)] = float(amount)
    return bias


def _prompt(value: Any) -> str:
    """A prompt as text: a string, token ids, or a batch of either (joined for text engines)."""
    if isinstance(value, str):
        return value
    if _is_token_ids(value):
        return " ".join(map(str, value))
    if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_ids(p) for p in value):
        return " ".join(_prompt(p) for p in value)
    raise invalid("prompt", "required, a string, a list of token ids, or a non-empty list of either")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT64_MAX for t in value)


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "required, a non-empty list")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(where, "must be an object")
    role = message.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise invalid(f"{where}.role", f"must be one of {', '.join(sorted(CHAT_ROLES))}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: the models served take text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise invalid(f"{where}.content", "only text content parts are supported")
        content = "".join(p["text"] for p in content)
    if content is None and role == "assistant":  # an assistant turn that only called tools
        content = ""
    if not isinstance(content, str):
        raise invalid(f"{where}.content", "must be a string or a list of text parts")
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid(f"{where}.name", "must be a string")
    return {"role": role, "content": content, **({"name": name} if name else {})}


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
