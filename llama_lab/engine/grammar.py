"""Grammars that constrain decoding: compiled once per schema, one matcher per request.

Built on llguidance (chosen by ``bench/grammar_bench.py``; see docs/structured_outputs.md): a JSON
schema or a Lark grammar becomes a matcher that, at each step, says which tokens may come next
as a bitmask (one bit per token, 32 per int32 word). The sampler applies the bitmask on the
logits' device; the engine thread advances each matcher with the token chosen.

Compiling happens on the caller's thread (the server's worker threads), never on the engine
thread, and is cached by grammar text: an agent that sends the same tools or schema with every
request pays for it once. The engine thread only copies a compiled matcher (microseconds).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
from typing import Any, Iterable, Literal

logger = logging.getLogger(__name__)

__all__ = ["GrammarSpec", "GrammarError", "CompiledGrammar", "GrammarCompiler"]


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled: the server turns it into a 400."""


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """What to compile: a JSON schema (canonical JSON text) or a Lark grammar. Hashable: the cache key."""

    kind: Literal["json_schema", "lark"]
    source: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> "GrammarSpec":
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))  # key order kept: it orders the output

    @classmethod
    def lark(cls, grammar: str) -> "GrammarSpec":
        return cls("lark", grammar)


class CompiledGrammar:
    """A compiled grammar; ``matcher()`` hands out a fresh matcher sharing the compiled tables."""

    def __init__(self, spec: GrammarSpec, pristine: Any) -> None:
        self.spec = spec
        self._pristine = pristine  # never advanced: copies start at the grammar's beginning

    def matcher(self) -> Any:
        return self._pristine.deep_copy()

    def __repr__(self) -> str:
        return f"CompiledGrammar({self.spec.kind}, {len(self.spec.source)} chars)"


class GrammarCompiler:
    """Compiles grammars for one tokenizer; thread-safe, with an LRU cache keyed by ``GrammarSpec``.

    ``stop_ids`` are the tokens that end a turn: once the grammar is complete, they are the tokens
    the bitmask allows, so a finished answer ends with the model's own end of turn.
    """

    def __init__(self, tokenizer: Any, stop_ids: Iterable[int], cache_size: int = 256) -> None:
        self._hf_tokenizer = tokenizer
        self._stop_ids = sorted(int(i) for i in stop_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[GrammarSpec, CompiledGrammar] = collections.OrderedDict()
        self._cache_size = cache_size
        self.vocab_size = len(tokenizer)

    def _llg_tokenizer(self) -> Any:
        """llguidance's view of the tokenizer (~0.5-1 s to build, once per model, on first use)."""
        if self._tokenizer is None:
            import llguidance.hf

            eos = self._stop_ids or None
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        return self._tokenizer

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar for ``spec``, from the cache when seen before; ``GrammarError`` if invalid."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
            tokenizer = self._llg_tokenizer()
        import llguidance

        try:
            if spec.kind == "json_schema":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    json.loads(spec.source), defaults={"whitespace_flexible": False})
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(spec.source)
        except Exception as exc:  # llguidance raises ValueError / RuntimeError with a readable text
            raise GrammarError(str(exc)) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise GrammarError("; ".join(messages) or "the grammar is invalid")
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        compiled = CompiledGrammar(spec, matcher)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled


def fill_bitmask(matchers: list[Any], mask: Any) -> None:
    """Write each matcher's allowed next tokens into row i of ``mask`` (host int32, contiguous)."""
    words = mask.shape[1]
    for i, m in enumerate(matchers):
        row = mask[i]
        m.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)
