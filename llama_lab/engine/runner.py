"""The contract between the engine and a runner: what the engine thread asks of the model's side.

A runner owns the model's forward and its KV cache and is used only from the engine thread. The
engine admits a request by ``reserve`` (its prompt plus ``max_tokens``, or None when the cache is
full), feeds prompt chunks to ``prefill`` as ``PrefillJob``s, advances every running request with
``decode``, and gives the room back with ``release``. The handle ``reserve`` returns is the runner's
own (``SeqCache`` for the paged runner); the engine only passes it back and reads ``length``.
Two runners keep it: ``PagedRunner`` (``FastLlama`` over the paged cache) and ``HFRunner`` (any other
architecture, through its own forward).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import torch


@dataclasses.dataclass
class SeqCache:
    """One request's place in the paged cache: its blocks, and the tokens whose keys and values they hold."""

    blocks: list[int]
    length: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)  # what fills positions 0..length-1


@dataclasses.dataclass
class PrefillJob:
    """A chunk of one prompt: ``tokens`` go to positions ``seq.length ...`` of the runner's handle ``seq``."""

    seq: Any
    tokens: Sequence[int]
    want_logits: bool  # the chunk ends the prompt: its last token's logits pick the first output token


class Runner(Protocol):
    """What the engine calls; see the module doc."""

    device: torch.device
    compile_error: str | None

    def reserve(self, tokens: int, prompt: Sequence[int] = ()) -> Any | None:
        """Room for ``tokens`` tokens (None if there is none); the handle's ``length`` counts the prompt
        tokens already cached (prefix caching)."""

    def release(self, seq: Any) -> None: ...

    def prefill(self, jobs: Sequence[PrefillJob], cancelled: Callable[[], bool]) -> torch.Tensor | None:
        """Logits ``[jobs wanting logits, vocab]`` or None; raises ``PrefillCancelled`` between layers."""

    def decode(self, seqs: Sequence[Any], tokens: Sequence[int]) -> torch.Tensor:
        """One token for each sequence: logits ``[len(seqs), vocab]``, float32, on the device."""

    def warm_up(self, defer: Callable[[Callable[[], Any]], Any] | None = None) -> float:
        """Compile or load what the first step needs (on the engine thread); seconds spent. Work that ends
        later (a compiled step built in the background) comes back through ``defer``, which runs a function
        on the engine thread between steps."""

    def describe(self) -> dict[str, Any]:
        """How it runs, for ``/health``: decode mode, attention, linears, compile state, KV cache."""
