"""Sampling for a whole batch on the model's device, with each row's own parameters and seed.

One call per step turns the batch's logits into token ids; only the chosen ids (and the
log-probabilities a request asked for) are copied to the host, once. Every tensor is created on
the logits' device and every generator lives there too: a CUDA batch never meets a CPU generator
(the bug that broke every sampled request on a GPU).

Exact semantics, per row: penalties (Hugging Face's repetition penalty over prompt and output,
OpenAI's presence/frequency penalties over the output), then temperature, then top-k, then top-p
over the renormalized top-k distribution (the token that crosses ``top_p`` is kept), then one
draw by inverse CDF with a uniform from the row's generator. Top-p looks at the ``TOP_P_CANDIDATES``
most likely tokens first and falls back to a full sort only for a row whose nucleus is larger, so
a CPU batch is not sorting 128k-entry vocabularies every step.

Before temperature, a row's ``logit_bias`` is added and, for a row with a grammar, every token its
grammar forbids gets ``-inf`` (the bitmask is filled on the host, copied to the device without a
sync, and applied to the constrained rows only: a batch without grammars never builds one). The
grammar's matcher advances on the host once the ids are there (``advance_grammars``), so a
constrained step still has one host synchronization.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

import torch

from llama_lab.defaults import DEFAULTS

if TYPE_CHECKING:
    from llama_lab.engine.grammar import CompiledGrammar

TOP_P_CANDIDATES = 64
_MIN_TEMPERATURE = 1e-5  # below this a temperature only changes rounding; treat it as this


@dataclasses.dataclass
class SamplingParams:
    """Everything that shapes one request's output; the server builds it in exactly one place."""

    max_tokens: int = DEFAULTS.max_tokens
    temperature: float = DEFAULTS.temperature
    top_p: float = DEFAULTS.top_p
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # benchmarks only: decode exactly max_tokens
    logit_bias: Sequence[tuple[int, float]] = ()  # (token id, added to its logit), OpenAI's -100..100
    grammar: "CompiledGrammar | None" = None  # constrains the output (engine.grammar); None: free text

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not self.repetition_penalty > 0 or math.isinf(self.repetition_penalty):
            raise ValueError("repetition_penalty must be a finite number > 0")
        if not (math.isfinite(self.presence_penalty) and math.isfinite(self.frequency_penalty)):
            raise ValueError("presence_penalty and frequency_penalty must be finite")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError("top_logprobs must be between 0 and 20")
        self.stop = tuple(s for s in self.stop if s)
        self.logit_bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        if any(t < 0 or not math.isfinite(b) for t, b in self.logit_bias):
            raise ValueError("logit_bias needs token ids >= 0 and finite biases")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on the device the logits live on (a CPU generator cannot drive CUDA sampling)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class RowState:
    """One request's sampling state on the device: its generator and, if penalized, its token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab: int, device: torch.device,
                 seed: int) -> None:
        self.params = params
        self.generator = make_generator(device, seed)
        self.counts: torch.Tensor | None = None  # output token counts (presence / frequency)
        self.seen: torch.Tensor | None = None  # prompt + output tokens (repetition penalty)
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab], dtype=torch.long, device=device)
            self.seen.index_fill_(0, ids, True)
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            known = [(t, b) for t, b in params.logit_bias if t < vocab]
            self.bias = (torch.tensor([t for t, _ in known], dtype=torch.long, device=device),
                         torch.tensor([b for _, b in known], dtype=torch.float32, device=device))
        self.matcher: Any = params.grammar.matcher() if params.grammar is not None else None
        self.mask_words = (vocab + 31) // 32


def record_tokens(rows: Sequence[RowState], tokens: torch.Tensor) -> None:
    """Count each row's chosen token (a device tensor, no host round trip) for its penalties."""
    for i, row in enumerate(rows):
        if row.counts is None and row.seen is None:
            continue
        token = tokens[i:i + 1]
        if row.counts is not None:
            row.counts.index_add_(0, token, torch.ones(1, dtype=row.counts.dtype, device=row.counts.device))
        if row.seen is not None:
            row.seen.index_fill_(0, token, True)


def apply_penalties(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Penalize a ``[B, V]`` float32 batch in place, each row by its own parameters."""
    for i, row in enumerate(rows):
        p = row.params
        if row.seen is not None:
            score = logits[i]
            penalized = torch.where(score > 0, score / p.repetition_penalty, score * p.repetition_penalty)
            logits[i] = torch.where(row.seen, penalized, score)
        if row.counts is not None:
            logits[i] -= row.counts * p.frequency_penalty + (row.counts > 0).to(logits.dtype) * p.presence_penalty
    return logits


def _check_generator(row: RowState, device: torch.device) -> None:
    if row.generator.device != device:
        raise RuntimeError(f"a sampling generator lives on {row.generator.device} but the logits on {device}")


def _uniforms(rows: Sequence[RowState], device: torch.device) -> torch.Tensor:
    """One uniform draw per row from the row's own generator: a seed reproduces its tokens."""
    for row in rows:
        _check_generator(row, device)
    return torch.cat([torch.rand(1, generator=row.generator, device=device) for row in rows])


def _scaled(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Temperature-scaled logits whose row maximum is 0: finite, whatever the penalties did."""
    finite = torch.nan_to_num(logits, nan=-1e30, posinf=1e30, neginf=-1e30)
    shifted = finite - finite.max(dim=-1, keepdim=True).values
    temps = torch.tensor([max(r.params.temperature, _MIN_TEMPERATURE) for r in rows], dtype=logits.dtype,
                         device=logits.device)
    return shifted / temps[:, None]


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of one index per row from unnormalized probabilities.

    The index is the number of cumulative sums at or below ``u * total``: never an entry of
    probability zero, at either end, for ``u`` in [0, 1).
    """
    cum = probs.cumsum(dim=-1)
    threshold = u * cum[:, -1]
    index = (cum <= threshold[:, None]).sum(dim=-1)
    return index.clamp_(max=probs.shape[-1] - 1)


def _nucleus(vals: torch.Tensor, lse: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities over sorted candidates with top-k and top-p applied (zeros where dropped)."""
    ranks = torch.arange(vals.shape[-1], device=vals.device)
    probs = torch.exp(vals - lse[:, None])
    probs = torch.where((top_k[:, None] > 0) & (ranks[None, :] >= top_k[:, None]), torch.zeros_like(probs), probs)
    probs = probs / probs.sum(dim=-1, keepdim=True)  # renormalized over top-k (no-op without top-k)
    before = probs.cumsum(dim=-1) - probs
    # The most likely token always stays, even for a top_p so small it rounds to zero.
    return torch.where((before >= top_p[:, None]) & (ranks[None, :] > 0), torch.zeros_like(probs), probs)


def _any(flags: torch.Tensor) -> bool:
    """A host decision from device flags (a sync; the device-neutrality test replaces it)."""
    return bool(flags.any())


def _sample_filtered(scaled: torch.Tensor, rows: Sequence[RowState], u: torch.Tensor) -> torch.Tensor:
    """Rows with top-k and/or top-p: candidates first, an exact full sort only where they fall short."""
    dev, vocab = scaled.device, scaled.shape[-1]
    top_k = torch.tensor([r.params.top_k if r.params.top_k < vocab else 0 for r in rows], device=dev)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=scaled.dtype, device=dev)
    k = min(vocab, max(r.params.top_k if 0 < r.params.top_k < vocab else TOP_P_CANDIDATES for r in rows))
    vals, ids = torch.topk(scaled, k, dim=-1)
    full_lse = torch.logsumexp(scaled, dim=-1)
    probs = _nucleus(vals, full_lse, top_k, top_p)
    picked = ids.gather(1, _draw(probs, u)[:, None])[:, 0]
    # A top-p row without top-k whose nucleus needs more than k tokens: the candidates do not cover it.
    mass = torch.exp(vals - full_lse[:, None]).sum(dim=-1)
    short = (top_k == 0) & (mass < top_p) & (k < vocab)
    if _any(short):  # rare: sort the group once and take the exact answer for the short rows
        svals, sids = torch.sort(scaled, dim=-1, descending=True)
        exact = sids.gather(1, _draw(_nucleus(svals, full_lse, top_k, top_p), u)[:, None])[:, 0]
        picked = torch.where(short, exact, picked)
    return picked


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Add each biased row's ``logit_bias`` in place (OpenAI: added to the logits before sampling)."""
    for i, row in enumerate(rows):
        if row.bias is not None:
            ids, values = row.bias
            logits[i].index_add_(0, ids, values)
    return logits


def grammar_bitmask(rows: Sequence[RowState], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The constrained rows' bitmasks ``[R, ceil(V/32)]`` int32 on ``device`` and their row indices.

    Filled on the host by each row's matcher; the copy to the device is queued without waiting.
    None when no row has a grammar: free batches build nothing.
    """
    from llama_lab.engine.grammar import fill_bitmask

    constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
    if not constrained:
        return None
    mask = torch.empty((len(constrained), rows[constrained[0]].mask_words), dtype=torch.int32)
    fill_bitmask([rows[i].matcher for i in constrained], mask)
    index = torch.tensor(constrained, dtype=torch.long)
    return mask.to(device, non_blocking=True), index.to(device, non_blocking=True)


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Set to ``-inf``, in the rows ``index`` of ``logits`` ``[B, V]``, every token whose bit in ``mask`` is 0.

    On a CPU with the C++ operators, one pass in place (``apply_token_bitmask_``); elsewhere torch ops.
    """
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()
            and hasattr(torch.ops.llama_lab, "apply_token_bitmask_")):
        torch.ops.llama_lab.apply_token_bitmask_(logits, mask.to("cpu", torch.int32).contiguous(), index.to("cpu", torch.int64))
        return logits
    return _apply_bitmask_torch(logits, mask, index)


def _apply_bitmask_torch(logits: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=mask.device)
    forbidden = ((mask[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab] == 0
    if forbidden.shape[1] < vocab:  # tokens past the grammar's vocabulary are never allowed
        forbidden = torch.nn.functional.pad(forbidden, (0, vocab - forbidden.shape[1]), value=True)
    rows = logits.index_select(0, index)
    rows.masked_fill_(forbidden, float("-inf"))
    return logits.index_copy_(0, index, rows)


def advance_grammars(rows: Sequence[RowState], ids: Sequence[int], stop_ids: frozenset[int] | set[int]) -> list[str | None]:
    """Feed each constrained row its chosen token (host ids, after the step's one sync).

    Returns, per row, None or the reason its grammar broke (the row then ends with an error).
    A stop token ends the request instead and is not fed.
    """
    errors: list[str | None] = [None] * len(rows)
    for i, (row, token) in enumerate(zip(rows, ids)):
        if row.matcher is None or token in stop_ids:
            continue
        if not row.matcher.consume_token(int(token)) or row.matcher.is_error():
            errors[i] = f"the grammar rejected token {token}: {row.matcher.get_error() or 'not allowed'}"
    return errors


def choose_tokens(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """The next token of every row, on the logits' device. ``logits`` is ``[B, V]`` float32."""
    adjusted = False
    if any(r.params.penalized for r in rows):
        logits, adjusted = apply_penalties(logits.clone(), rows), True
    if any(r.bias is not None for r in rows):
        logits = apply_logit_bias(logits if adjusted else logits.clone(), rows)
        adjusted = True
    bitmask = grammar_bitmask(rows, logits.device)
    if bitmask is not None:
        logits = apply_bitmask(logits if adjusted else logits.clone(), *bitmask)
    out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        index = torch.tensor(greedy, device=logits.device)
        out[index] = torch.argmax(logits[index], dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not sampled:
        return out
    subset = [rows[i] for i in sampled]
    index = torch.tensor(sampled, device=logits.device)
    scaled = _scaled(logits[index], subset)
    u = _uniforms(subset, logits.device)
    filtered = [j for j, r in enumerate(subset) if r.params.top_p < 1.0 or r.params.top_k > 0]
    plain = [j for j, r in enumerate(subset) if not (r.params.top_p < 1.0 or r.params.top_k > 0)]
    picked = torch.empty(len(subset), dtype=torch.long, device=logits.device)
    if plain:
        j = torch.tensor(plain, device=logits.device)
        picked[j] = _draw(torch.exp(scaled[j]), u[j])
    if filtered:
        j = torch.tensor(filtered, device=logits.device)
        picked[j] = _sample_filtered(scaled[j], [subset[i] for i in filtered], u[j])
    out[index] = picked
    return out


def logprob_tensors(raw_logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the device: each row's chosen-token log-probability and its ``top`` best (values, ids)."""
    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    top_vals, top_ids = torch.topk(lp, max(top, 1), dim=-1)
    return chosen, top_vals, top_ids


def logprob_entries(raw_logits: torch.Tensor, tokens: torch.Tensor, rows: Sequence[RowState],
                    tokenizer: Any) -> list[dict[str, Any] | None]:
    """Each row's chosen token's log-probability under the model (before any adjustment), plus its
    ``top_logprobs`` alternatives, for the rows that asked; None for the others."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs]
    out: list[dict[str, Any] | None] = [None] * len(rows)
    if not wanted:
        return out
    index = torch.tensor(wanted, device=raw_logits.device)
    top = max(rows[i].params.top_logprobs for i in wanted)
    chosen, top_vals, top_ids = (t.tolist() for t in logprob_tensors(raw_logits[index], tokens[index], top))
    token_list = tokens[index].tolist()
    for j, i in enumerate(wanted):
        n = rows[i].params.top_logprobs
        out[i] = {"token_id": token_list[j], "token": tokenizer.decode([token_list[j]]), "logprob": chosen[j],
                  "top_logprobs": [{"token_id": t, "token": tokenizer.decode([t]), "logprob": v}
                                   for t, v in zip(top_ids[j][:n], top_vals[j][:n])]}
    return out
