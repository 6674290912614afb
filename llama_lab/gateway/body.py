"""Request bodies that cannot freeze the gateway: big JSON parsed off the event loop, and sent on unencoded.

The size limit itself is ``web.body_limit.BodyLimit``, which both apps share.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, TypeVar

import anyio

_T = TypeVar("_T")

# Below this, parsing on the event loop is quicker than the hop to a worker thread and back.
OFF_LOOP_BYTES = 256 * 1024


async def off_loop_if_large(size: int, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` on a worker thread when it works on ``size`` bytes or more (JSON of a big body).

    The C JSON parser holds the GIL for its whole call, so a thread does not make a 4 MB parse
    free, but the event loop gets the GIL back between the calls instead of waiting for the
    whole request's parse, estimate and re-serialization in one go.
    """
    if size < OFF_LOOP_BYTES:
        return fn(*args)
    return await anyio.to_thread.run_sync(partial(fn, *args))


def dump_json(value: Any) -> str:
    """Compact JSON, as httpx would send it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_WS = re.compile(r"[ \t\n\r]*")
_SCAN = json.JSONDecoder().scan_once  # the C scanner json.loads uses, one value at a time


@dataclass
class JsonObject:
    """A client's JSON object, parsed, with the text of each top-level value kept.

    The body sent upstream is the client's text with a few top-level keys replaced (``with_changes``),
    so a 4 MB conversation is parsed once and never encoded again: encoding it back would hold the
    GIL as long as parsing it did.
    """

    values: dict[str, Any]
    text: str = ""
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    def with_changes(self, changes: dict[str, Any]) -> bytes:
        if not self.spans:  # parsed the slow way (see parse_object): encode it all
            return dump_json({**self.values, **changes}).encode()
        parts = [f"{dump_json(k)}:{self.text[a:b]}" for k, (a, b) in self.spans.items() if k not in changes]
        parts += [f"{dump_json(k)}:{dump_json(v)}" for k, v in changes.items()]
        return ("{" + ",".join(parts) + "}").encode()


def parse_object(raw: bytes) -> JsonObject:
    """Parse a JSON object body (ValueError with json's own message when it is not valid JSON)."""
    text = raw.decode(json.detect_encoding(raw))
    try:
        return _scan_object(text)
    except (ValueError, StopIteration, IndexError):
        return JsonObject(json.loads(text))  # json's error message, or an odd-but-valid body (no spans)


def _scan_object(text: str) -> JsonObject:
    idx = _WS.match(text, 0).end()
    if text[idx] != "{":
        raise ValueError("not an object")
    obj = JsonObject({}, text)
    idx = _WS.match(text, idx + 1).end()
    if text[idx] == "}":
        return _end(obj, text, idx)
    while True:
        if text[idx] != '"':
            raise ValueError("expecting a key")
        key, idx = json.decoder.scanstring(text, idx + 1)
        idx = _WS.match(text, idx).end()
        if text[idx] != ":":
            raise ValueError("expecting ':'")
        start = _WS.match(text, idx + 1).end()
        value, end = _SCAN(text, start)
        obj.values[key] = value
        obj.spans[key] = (start, end)  # a repeated key: the last one wins, as in json.loads
        idx = _WS.match(text, end).end()
        if text[idx] == "}":
            return _end(obj, text, idx)
        if text[idx] != ",":
            raise ValueError("expecting ',' or '}'")
        idx = _WS.match(text, idx + 1).end()


def _end(obj: JsonObject, text: str, idx: int) -> JsonObject:
    if _WS.match(text, idx + 1).end() != len(text):
        raise ValueError("extra data")
    return obj
