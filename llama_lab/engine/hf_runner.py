"""The fallback runner: any Hugging Face causal LM, through its own forward and a ``DynamicCache``.

Used for architectures ``FastLlama`` does not cover (the engine logs which and why). Each prompt
is prefilled into its own cache; it then joins a left-padded batch cache that advances one token
per step for all sequences, and leaves it by index selection. Correct and general, at the speed of
``model.generate``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable, Sequence

import torch

from llama_lab.engine.llama import PrefillCancelled

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class HFSeq:
    """One request's cache while it is prefilled alone; ``None`` once it joined the batch."""

    cache: Any = None
    length: int = 0


class HFRunner:
    """Prefill per sequence, decode the left-padded batch; used only from the engine thread."""

    attention = "transformers"
    mode = "eager (transformers)"
    compile_seconds: float | None = 0.0
    compile_error: str | None = None

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.device = torch.device(loaded.device)
        params = inspect.signature(loaded.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x
        self._batch: list[HFSeq] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._cancelled: Callable[[], bool] | None = None
        decoder = getattr(loaded.model, "model", None)
        # A cancel interrupts a prefill forward between decoder layers (a chunk can take a second).
        self._hooks = [layer.register_forward_pre_hook(self._check_cancel) for layer in getattr(decoder, "layers", ())]

    def describe(self) -> dict[str, Any]:
        return {"runner": type(self).__name__, "decode": self.mode, "attention": self.attention,
                "eager_linears": "torch", "compile_error": self.compile_error, "compiled_package": None,
                "kv_cache_tokens": None, "kv_cache_dtype": None, "kv_block_size": None, "prefix_caching": False}

    def close(self) -> None:
        for hook in self._hooks:  # the model may outlive this runner (notebooks, tests)
            hook.remove()
        self._hooks = []

    def _check_cancel(self, module: Any, args: Any) -> None:
        if self._cancelled is not None and self._cancelled():
            raise PrefillCancelled

    def reserve(self, tokens: int, prompt: Sequence[int] = ()) -> HFSeq:
        return HFSeq()  # no prefix cache here: every prompt is computed

    def release(self, seq: HFSeq) -> None:
        if seq in self._batch:
            self._drop([i for i, s in enumerate(self._batch) if s is not seq])
        seq.cache = None

    def warm_up(self, defer: Callable[[Callable[[], Any]], Any] | None = None) -> float:
        return 0.0

    @torch.inference_mode()
    def prefill(self, jobs: Sequence[Any], cancelled: Callable[[], bool]) -> torch.Tensor | None:
        """``jobs`` are ``PrefillJob``s (seq, tokens, want_logits), each run through its own cache."""
        from transformers import DynamicCache

        model = self.loaded.model
        logits = []
        self._cancelled = cancelled
        try:
            for job in jobs:
                if job.seq.cache is None:
                    job.seq.cache = DynamicCache(config=model.config)
                ids = torch.tensor([list(job.tokens)], device=self.device)
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: job.seq.cache})
                job.seq.length += len(job.tokens)
                if job.want_logits:
                    logits.append(out.logits[0, -1].float())
        finally:
            self._cancelled = None
        return torch.stack(logits) if logits else None

    @torch.inference_mode()
    def decode(self, seqs: Sequence[HFSeq], tokens: Sequence[int]) -> torch.Tensor:
        for seq in seqs:
            if seq not in self._batch:
                self._merge(seq)
        order = [self._batch.index(s) for s in seqs]
        if order != list(range(len(self._batch))):
            self._drop(order)
        dev = self.device
        ids = torch.tensor([[t] for t in tokens], device=dev)
        positions = torch.tensor([[s.length] for s in seqs], device=dev)
        if self._mask is not None:
            self._mask = torch.cat([self._mask, torch.ones((len(seqs), 1), dtype=self._mask.dtype, device=dev)], dim=1)
        out = self.loaded.model(input_ids=ids, attention_mask=self._mask, position_ids=positions, use_cache=True,
                                **{self._cache_kw: self._cache})
        for s in seqs:
            s.length += 1
        return out.logits[:, -1, :].float()

    def _merge(self, seq: HFSeq) -> None:
        """Join a freshly prefilled sequence to the batch, left-padding the shorter side."""
        row_cache, seq.cache = seq.cache, None
        if not self._batch:
            self._batch, self._cache, self._mask = [seq], row_cache, None
            return
        t_old, t_new = self._cache.get_seq_length(), row_cache.get_seq_length()
        t = max(t_old, t_new)
        dev = self.device
        mask = self._mask if self._mask is not None else torch.ones((len(self._batch), t_old), dtype=torch.long, device=dev)
        new_mask = torch.ones((1, t_new), dtype=torch.long, device=dev)
        self._mask = torch.cat([_left_pad(mask, t), _left_pad(new_mask, t)], dim=0)
        for old, new in zip(self._cache.layers, row_cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, t, dim=2), _left_pad(new.keys, t, dim=2)], dim=0)
            old.values = torch.cat([_left_pad(old.values, t, dim=2), _left_pad(new.values, t, dim=2)], dim=0)
        self._batch.append(seq)

    def _drop(self, keep: list[int]) -> None:
        """Keep these batch rows, in this order; trim columns that became padding in every row."""
        if not keep:
            self._batch, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._batch = [self._batch[i] for i in keep]
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        if self._mask is not None:
            mask = self._mask[index]
            lead = int((mask.sum(0) == 0).long().cumprod(0).sum())
            if lead:
                mask = mask[:, lead:]
                for layer in self._cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self._mask = None if bool(mask.all()) else mask


def _left_pad(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
