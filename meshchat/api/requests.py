"""Validate OpenAI-style request bodies into typed requests; errors carry HTTP status codes.

Only the fields meshchat acts on are read; unknown fields are ignored, as OpenAI-compatible
servers usually do, but a known field of the wrong type is a 400 naming the field. A body that
is not plain JSON (NaN, Infinity, integers past 64 bits, nesting deeper than Python's parser
goes, text that is not valid Unicode) is a 400 too, never a 500.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from meshchat.engine.chat_template import ChatMessage
from meshchat.engine.sampling import SamplingParams
from meshchat.errors import MeshchatError

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4
MAX_INT_DIGITS = 20  # 2**64 has 20 digits: any integer OpenAI's API takes fits
INT64 = (-(2**63), 2**63 - 1)  # OpenAI's range for `seed`
MAX_TOKENS_LIMIT = 2**31 - 1  # far beyond any context; only absurd values are refused


class ApiError(MeshchatError):
    """An error answered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds, sent as the Retry-After header

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ApiError(400, f"malformed JSON: an integer has over {MAX_INT_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(400, f"malformed JSON: {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ApiError(400, f"malformed JSON: {name} is not a JSON number")


def decode_body(text: str) -> Any:
    """Plain JSON or an ApiError(400) saying what is wrong with it."""
    try:
        return json.loads(
            text,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from exc
    except RecursionError as exc:  # the parser recurses once per nesting level
        raise ApiError(400, "malformed JSON: nested too deeply") from exc


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    params: SamplingParams
    max_tokens: int | None
    stop: list[str]
    stream: bool
    messages: list[ChatMessage] | None = None  # chat completions
    prompt: str | None = None  # raw completions


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; a number field must not accept true/false.
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' must be {_kind_names(kinds)}", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {_kind_names(kinds)}", param=name)
    return value


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "a boolean",
        list: "an array",
        dict: "an object",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _text(value: str, param: str) -> str:
    """`value`, if it is text llama.cpp can take (JSON may carry lone UTF-16 surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"'{param}' is not valid Unicode text", param=param) from exc
    return value


def _in_range(name: str, value: float, low: float, high: float) -> float:
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must lie in [{low}, {high}], got {value}", param=name)
    return value


def _common(body: Any) -> tuple[str, SamplingParams, int | None, list[str], bool]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _field(body, "model", (str,), "")
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    top_p = float(_field(body, "top_p", (int, float), 1.0))
    max_tokens = _field(body, "max_completion_tokens", (int,), None)
    max_tokens = _field(body, "max_tokens", (int,), max_tokens)
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ApiError(400, f"'max_tokens' must lie in [1, {MAX_TOKENS_LIMIT}]", param="max_tokens")
    seed = _field(body, "seed", (int,), None)
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise ApiError(400, "'seed' must be a 64-bit integer", param="seed")
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stop = _field(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"'stop' must be a string or up to {MAX_STOPS} strings", param="stop")
    stops = [_text(s, "stop") for s in stops]
    stream = _field(body, "stream", (bool,), False)
    params = SamplingParams(
        temperature=_in_range("temperature", temperature, 0.0, 2.0),
        top_p=_in_range("top_p", top_p, 0.0, 1.0),
        top_k=0,
        min_p=0.0,
        seed=seed,
    )
    return model, params, max_tokens, stops, stream


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):  # the parts form: [{"type": "text", "text": "..."}]
        parts = []
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    400, "only text content parts are supported", param=f"messages[{index}].content"
                )
            parts.append(_text(part["text"], param))
        return "".join(parts)
    raise ApiError(400, "message content must be a string", param=f"messages[{index}].content")


def parse_chat(body: Any) -> GenerationRequest:
    model, params, max_tokens, stops, stream = _common(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(
                400,
                f"messages[{index}] needs a role among {', '.join(ROLES)}",
                param=f"messages[{index}]",
            )
        messages.append(ChatMessage(message["role"], _content(message, index)))
    return GenerationRequest(model, params, max_tokens, stops, stream, messages=messages)


def parse_completion(body: Any) -> GenerationRequest:
    model, params, max_tokens, stops, stream = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
    prompt = _text(prompt, "prompt")
    return GenerationRequest(model, params, max_tokens or 16, stops, stream, prompt=prompt)
