"""Client messages of the websocket protocol: parsed and checked into typed requests, or a clear error.

Every check names the bad value and what is allowed, so the page can show the message as it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from diagvid.serve.settings import ServeSettings

SEED_LIMIT = 2**31
MESSAGE_TYPES = ("start", "prompt", "stop")
_FIELDS = {
    "start": {"type", "prompt", "seconds", "endless", "seed", "schedule"},
    "prompt": {"type", "prompt"},
    "stop": {"type"},
}


class ProtocolError(ValueError):
    """A client message the server will not act on; the message goes back to the client as it is."""


@dataclass(frozen=True)
class StartRequest:
    """Start a stream: `seconds` of video, or until stopped (`seconds=None`, capped at the server limit)."""

    prompt: str
    seconds: float | None
    seed: int
    schedule: str


@dataclass(frozen=True)
class PromptRequest:
    """Follow a new prompt from the next chunk on."""

    prompt: str


@dataclass(frozen=True)
class StopRequest:
    """Stop the stream (or leave the queue)."""


Request = StartRequest | PromptRequest | StopRequest


def parse_message(
    raw: str,
    settings: ServeSettings,
    default_schedule: str,
    check_prompt: Callable[[str], object] | None = None,
) -> Request:
    """A client's text message -> a request, or ProtocolError naming what is wrong.

    `check_prompt` is the model's own prompt check (the text encoder's tokenizer): unknown words fail here,
    not in the middle of a stream.
    """
    size = len(raw.encode("utf-8", errors="replace"))
    if size > settings.max_message_bytes:
        raise ProtocolError(
            f"message of {size} bytes is over the limit of {settings.max_message_bytes} bytes"
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ProtocolError(
            f'message is not JSON ({err.msg}); send an object like {{"type": "stop"}}'
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(f"message must be a JSON object, not {type(data).__name__}")
    kind = data.get("type")
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {_show(kind)}; allowed: {list(MESSAGE_TYPES)}")
    extra = sorted(set(data) - _FIELDS[kind])
    if extra:
        raise ProtocolError(
            f"unknown field {extra[0]!r} in a {kind!r} message; allowed: {sorted(_FIELDS[kind])}"
        )
    if kind == "stop":
        return StopRequest()
    prompt = check_prompt_text(data.get("prompt"), settings, check_prompt)
    if kind == "prompt":
        return PromptRequest(prompt)
    return StartRequest(
        prompt=prompt,
        seconds=_seconds(data, settings),
        seed=_seed(data.get("seed", 0)),
        schedule=_schedule(data.get("schedule"), settings, default_schedule),
    )


def check_prompt_text(
    prompt: object, settings: ServeSettings, check_prompt: Callable[[str], object] | None = None
) -> str:
    """A prompt the model can take: a non-empty string of printable characters within the length limit."""
    if not isinstance(prompt, str):
        raise ProtocolError(f"prompt={_show(prompt)} must be a string")
    text = prompt.strip()
    if not text:
        raise ProtocolError("prompt is empty; describe the video, e.g. 'a red circle moves left'")
    if len(text) > settings.max_prompt_chars:
        raise ProtocolError(f"prompt has {len(text)} characters; the limit is {settings.max_prompt_chars}")
    bad = next((c for c in text if not c.isprintable()), None)
    if bad is not None:
        raise ProtocolError(
            f"prompt contains the non-printable character {bad!r}; only printable text is allowed"
        )
    if check_prompt is not None:
        try:
            check_prompt(text)
        except ValueError as err:
            raise ProtocolError(str(err)) from None
    return text


def _seconds(data: dict, settings: ServeSettings) -> float | None:
    endless = data.get("endless", False)
    if not isinstance(endless, bool):
        raise ProtocolError(f"endless={_show(endless)} must be true or false")
    seconds = data.get("seconds")
    if endless:
        if seconds is not None:
            raise ProtocolError("give seconds or endless=true, not both")
        return None
    if seconds is None:
        raise ProtocolError(f"give seconds (a number in (0, {settings.max_seconds}]) or endless=true")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ProtocolError(f"seconds={_show(seconds)} must be a number in (0, {settings.max_seconds}]")
    if not 0 < seconds <= settings.max_seconds:
        raise ProtocolError(f"seconds={seconds!r} is outside (0, {settings.max_seconds}], the server's limit")
    return float(seconds)


def _seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ProtocolError(f"seed={_show(seed)} must be an integer in [0, {SEED_LIMIT - 1}]")
    return seed


def _schedule(schedule: object, settings: ServeSettings, default: str) -> str:
    if schedule is None:
        return default
    if schedule not in settings.schedules:
        raise ProtocolError(f"schedule={_show(schedule)} is not allowed; allowed: {list(settings.schedules)}")
    return str(schedule)


def _show(value: object) -> str:
    """A client's value for an error message, cut short: it is echoed back, never trusted."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
