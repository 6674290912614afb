"""Incremental detokenization that never splits a UTF-8 character, and stop strings."""

from __future__ import annotations

from typing import Any, Sequence


class Detokenizer:
    """Turns a stream of ids into text deltas that never split a UTF-8 character.

    Decodes a small window (a few prompt tokens of context, then the new ids) and holds back
    text while it ends in U+FFFD, i.e. while a multi-byte character is still incomplete.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = tuple(stop)
        self.text = ""  # all decoded output text
        self.released = 0  # how much of ``text`` was handed out
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Feed one token; return the text that is now safe to show (may be empty)."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if not self.stop:
            out, self.released = self.text[self.released:], len(self.text)
            return out
        start = max(0, self.released - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.released:cut] if cut > self.released else ""
            self.released = max(self.released, cut)
            self.stopped = True
            return out
        hold = 0  # keep back a tail that could be the start of a stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        upto = max(self.released, len(self.text) - hold)
        out, self.released = self.text[self.released:upto], upto
        return out

    def flush(self) -> str:
        """At the end of generation: whatever was held back, unless a stop string cut it."""
        if self.stopped:
            return ""
        out, self.released = self.text[self.released:], len(self.text)
        return out
