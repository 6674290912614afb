"""Reading tool calls out of generated text, incrementally, for the one streaming path.

The parser sees the answer's text deltas and turns them into events: plain ``content``, and for
each call a ``start`` (index, id, name: what OpenAI's first ``delta.tool_calls[i]`` chunk
carries) followed by ``arguments`` fragments. The SSE serializer sends the events as chunks; the
JSON answer collects the same events (the non-streaming answer is the stream, collected).

Calls are recognized in the model's tool format (``model.chat.ToolFormat``): between
``<tool_call>`` tags (Hermes / Qwen2.5, and the generic prompt), or as one JSON object that is the
whole answer (Llama 3.1/3.2). The arguments are streamed as they are written when the call's
JSON starts with its name, as the grammar writes it; otherwise they come whole at the call's end.
Text that looks like a call but is not valid JSON is given back as content.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from llama_lab.model.chat import ToolFormat


@dataclasses.dataclass
class ToolEvent:
    kind: str  # "content" | "start" | "arguments"
    text: str = ""
    index: int = 0
    id: str = ""
    name: str = ""


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class ToolCallParser:
    """Feed text deltas, get ``ToolEvent``s; ``finish()`` flushes what is held back."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.calls = 0
        self._buffer = ""  # text not yet given out
        self._inside = False  # between a call's opening and closing tags
        self._head_sent = False  # this call's start event is out; its arguments are streaming
        self._args_sent = 0  # characters of the current call's arguments region already sent
        self._whole = None if fmt.call_start else ""  # Llama 3 JSON: decided by the answer's first character

    def feed(self, text: str) -> list[ToolEvent]:
        if not text:
            return []
        if self._whole is not None or not self.fmt.call_start:
            return self._feed_whole(text)
        self._buffer += text
        return self._scan(final=False)

    def finish(self) -> list[ToolEvent]:
        if not self.fmt.call_start:
            return self._finish_whole()
        events = self._scan(final=True)
        if self._inside:  # cut off inside a call (max_tokens): what was written is given back as it is
            events += self._close_call(self._buffer, complete=False)
            self._inside = False
            self._buffer = ""
        elif self._buffer:
            events.append(ToolEvent("content", self._buffer))
            self._buffer = ""
        return events

    # ------------------------------------------------------------ tagged calls

    def _scan(self, final: bool) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        start, end = self.fmt.call_start.strip(), self.fmt.call_end.strip()
        while True:
            if not self._inside:
                at = self._buffer.find(start)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self._buffer, start)
                    emit = self._buffer[: len(self._buffer) - keep]
                    if emit and (self.calls == 0 or emit.strip()):
                        events.append(ToolEvent("content", emit))
                    self._buffer = self._buffer[len(emit):]
                    return events
                before = self._buffer[:at]
                if before and (self.calls == 0 or before.strip()):
                    events.append(ToolEvent("content", before))
                self._buffer = self._buffer[at + len(start):]
                self._inside, self._head_sent, self._args_sent = True, False, 0
                continue
            at = self._buffer.find(end)
            if at < 0:
                events += self._stream_arguments()
                return events
            body, self._buffer = self._buffer[:at], self._buffer[at + len(end):]
            events += self._close_call(body, complete=True)
            self._inside = False

    def _stream_arguments(self) -> list[ToolEvent]:
        """Send the call's name as soon as it is known, then its arguments as they come.

        Held back: the tail that may still turn out to be the closing ``}`` and end tag.
        """
        head = _HEAD.match(self._buffer)
        if head is None:
            return []
        events = []
        if not self._head_sent:
            events.append(ToolEvent("start", index=self.calls, id=new_call_id(), name=json.loads(f'"{head.group(1)}"')))
            self._head_sent = True
        region = self._buffer[head.end():]
        safe = len(region) - (len(self.fmt.call_end) + 2)
        if safe > self._args_sent:
            events.append(ToolEvent("arguments", region[self._args_sent:safe], index=self.calls))
            self._args_sent = safe
        return events

    def _close_call(self, body: str, complete: bool) -> list[ToolEvent]:
        """The call's remaining events; a body that is not a call becomes content again."""
        parsed = _parse_call(body, self.fmt) if complete else None
        events: list[ToolEvent] = []
        if parsed is None and not self._head_sent:
            return [ToolEvent("content", self.fmt.call_start.strip() + body + (self.fmt.call_end.strip() if complete else ""))]
        if not self._head_sent:
            name, arguments = parsed  # type: ignore[misc]
            events.append(ToolEvent("start", index=self.calls, id=new_call_id(), name=name))
            events.append(ToolEvent("arguments", arguments, index=self.calls))
        else:
            head = _HEAD.match(body)
            region = body[head.end():] if head else ""
            rest = region[self._args_sent:]
            if complete:
                rest = rest.rstrip()
                rest = rest[:-1] if rest.endswith("}") else rest  # the call object's own closing brace
            if rest:
                events.append(ToolEvent("arguments", rest, index=self.calls))
        self.calls += 1
        self._head_sent, self._args_sent = False, 0
        return events

    # ------------------------------------------------------------ whole-answer JSON (Llama 3)

    def _feed_whole(self, text: str) -> list[ToolEvent]:
        if self._whole is None:
            self._whole = ""
        self._whole += text
        stripped = self._whole.lstrip()
        if not stripped:
            return []
        if stripped.startswith("{") and self.calls >= 0:
            return []  # maybe a call: held until the end
        out, self._whole = self._whole, ""
        self.calls = -1  # plain text from here on
        return [ToolEvent("content", out)]

    def _finish_whole(self) -> list[ToolEvent]:
        text, self._whole = self._whole or "", ""
        if not text:
            return []
        parsed = _parse_call(text, self.fmt) if self.calls >= 0 else None
        if parsed is None:
            return [ToolEvent("content", text)]
        self.calls = 1
        return [ToolEvent("start", index=0, id=new_call_id(), name=parsed[0]), ToolEvent("arguments", parsed[1], index=0)]


def _parse_call(body: str, fmt: ToolFormat) -> tuple[str, str] | None:
    """``(name, arguments as a JSON string)`` from one call's JSON, or None when it is not one."""
    try:
        obj: Any = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(fmt.arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (held back: the tag may be arriving)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
