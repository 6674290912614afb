"""Per-request sampling parameters and the pure functions that choose the next token."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch


@dataclasses.dataclass
class SamplingParams:
    """Everything that shapes one request's output; the server builds it in exactly one place."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # benchmarks only: decode exactly max_tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError("top_logprobs must be between 0 and 20")
        self.stop = tuple(s for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """HF-style repetition penalty over prompt+output, OpenAI-style presence/frequency over output.

    ``seen`` holds the distinct ids of prompt and output; ``counts`` is a dense per-vocab count
    of output tokens. Works on one row (1-D logits).
    """
    if p.repetition_penalty != 1.0 and seen.numel():
        score = logits[seen]
        logits[seen] = torch.where(score > 0, score / p.repetition_penalty, score * p.repetition_penalty)
    if p.frequency_penalty or p.presence_penalty:
        logits -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
    return logits


def sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """Sample one token from one row of float32 logits (already penalized)."""
    if p.greedy:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # keep the token that crosses top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(raw_logits: torch.Tensor, token: int, top: int, tokenizer: Any) -> dict[str, Any]:
    """The chosen token's log-probability under the model, plus the ``top`` alternatives."""
    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    entry: dict[str, Any] = {"token_id": token, "token": tokenizer.decode([token]), "logprob": float(lp[token])}
    if top:
        vals, ids = torch.topk(lp, top)
        entry["top_logprobs"] = [
            {"token_id": int(i), "token": tokenizer.decode([int(i)]), "logprob": float(v)} for v, i in zip(vals, ids)
        ]
    else:
        entry["top_logprobs"] = []
    return entry
