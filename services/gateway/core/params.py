"""Which OpenAI (and vLLM extra) request parameters the gateway honours, and which it refuses.

Every parameter either changes the answer as it does on vLLM's OpenAI server (parsed in
`protocol`) or, when its value would change the answer in a way this gateway does not implement,
is refused with a 400 naming it. A value that asks for the default behaviour (`logprobs: false`,
`n: 1`, `response_format: {"type": "text"}`) is accepted. Unknown parameters are refused, as OpenAI
does. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any, Callable

from services.gateway.core.errors import ApiError

# parsed and honoured by protocol.parse_request
HONOURED_COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p", "min_tokens",
    "stop_token_ids", "logit_bias", "ignore_eos",
})
HONOURED_CHAT = HONOURED_COMMON | {"messages", "max_completion_tokens"}
HONOURED_COMPLETION = HONOURED_COMMON | {"prompt"}
# no effect on the answer (request metadata, identifiers for abuse monitoring or caching)
METADATA = frozenset({"user", "metadata", "prompt_cache_key", "safety_identifier"})


def _none(value: Any) -> bool:
    return value is None


def _falsy(value: Any) -> bool:
    return value is None or value is False


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _equals(*neutral: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or any(value == n and type(value) is type(n) for n in neutral)


# parameter -> does this value ask for the default behaviour? (any other value is refused)
NEUTRAL_ONLY: dict[str, Callable[[Any], bool]] = {
    "logprobs": _falsy,  # chat: bool; completions: int (any int asks for log-probabilities)
    "top_logprobs": _equals(0),
    "echo": _falsy,
    "best_of": _equals(1),
    "suffix": _equals(""),
    "tools": _empty,
    "functions": _empty,
    "tool_choice": _equals("none", "auto"),
    "function_call": _equals("none", "auto"),
    "parallel_tool_calls": lambda value: value is None or isinstance(value, bool),
    "response_format": lambda value: value is None or value == {"type": "text"},
    "modalities": lambda value: value is None or value == ["text"],
    "audio": _none,
    "prediction": _none,
    "reasoning_effort": _none,
    "verbosity": _none,
    "web_search_options": _none,
    "store": _falsy,
    "service_tier": _equals("auto", "default"),
    # vLLM's extra parameters
    "prompt_logprobs": _none,
    "use_beam_search": _falsy,
    "length_penalty": _equals(1.0, 1),
    "include_stop_str_in_output": _falsy,
    "skip_special_tokens": _equals(True),
    "spaces_between_special_tokens": _equals(True),
    "add_generation_prompt": _equals(True),
    "continue_final_message": _falsy,
    "bad_words": _empty,
    "allowed_token_ids": _none,
    "truncate_prompt_tokens": _none,
    "return_tokens_as_token_ids": _falsy,
    "guided_json": _none, "guided_regex": _none, "guided_choice": _none, "guided_grammar": _none,
    "structured_outputs": _none,
    "priority": _equals(0),
}


def check_parameters(data: dict[str, Any], chat: bool) -> None:
    """Raise ApiError(400) for the first parameter this gateway would otherwise ignore."""
    honoured = HONOURED_CHAT if chat else HONOURED_COMPLETION
    for name in sorted(data):
        if name in honoured or name in METADATA:
            continue
        neutral = NEUTRAL_ONLY.get(name)
        if neutral is None:
            raise ApiError(400, f"unrecognized request argument supplied: {name}", param=name,
                           code="unsupported_parameter")
        if not neutral(data[name]):
            raise ApiError(400, f"{name}: not supported by this server (only its default is accepted)",
                           param=name, code="unsupported_parameter")
