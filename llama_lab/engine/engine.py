"""The generation engine: one thread owns the model and decodes every running request together.

Requests are prefilled one at a time (in chunks, so a cancel lands between chunks) and then
joined to a left-padded batch that advances one token per step for all of them: continuous
batching on top of a plain ``DynamicCache``. Each request keeps its own sampling parameters and
random generator. A cancelled request is dropped before the next forward pass, so it costs at
most the one step already running. When nothing is queued, the thread sleeps on a condition
variable: an idle server uses no CPU.

The one streaming generator (``stream``, or ``submit`` with a sink) is the only way out; ``generate``
drains it. The server's asyncio glue lives in ``llama_lab.server.generation``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import inspect
import itertools
import logging
import queue
import secrets
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch

from llama_lab.engine.detokenizer import Detokenizer
from llama_lab.engine.sampling import SamplingParams, apply_penalties, sample_row, token_logprobs
from llama_lab.model.loading import LoadedModel

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Delta", "Completion", "RequestHandle", "EngineOverloaded", "EngineClosed"]


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the server maps this to 429."""


class _PrefillCancelled(Exception):
    """Raised inside the model's forward pass to abandon a cancelled prompt."""


class EngineClosed(RuntimeError):
    """The engine was closed while a request was waiting or running."""


@dataclasses.dataclass
class Delta:
    """A piece of one request's output; the last one carries ``finish_reason``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    logprobs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass
class Completion:
    """A drained stream."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any]]
    first_token_s: float | None
    total_s: float


@dataclasses.dataclass
class EngineStats:
    """Counters read by /metrics and by the tests that count steps after a cancel."""

    steps: int = 0  # forward passes of the decode batch
    prefill_chunks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    running: int = 0
    waiting: int = 0


class RequestHandle:
    """One request's link to the engine thread: events out, cancel in. Thread-safe."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams,
                 sink: Callable[[Delta], None]) -> None:
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self._sink = sink
        self.cancelled = threading.Event()
        self.cancel_step: int | None = None  # engine step counter when cancel() was called
        self.last_step: int | None = None  # last decode step that included this request
        self.steps_run = 0
        self.done = threading.Event()
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        """Ask the engine to drop this request before its next step (no-op once finished)."""
        if not self.cancelled.is_set() and not self.done.is_set():
            self.cancel_step = self._engine_steps()
            self.cancelled.set()

    _engine_steps: Callable[[], int] = staticmethod(lambda: 0)

    @property
    def steps_after_cancel(self) -> int:
        """Decode steps this request took part in after cancel(): the tests want <= 1."""
        if self.cancel_step is None or self.last_step is None:
            return 0
        return max(0, self.last_step - self.cancel_step)


@dataclasses.dataclass
class _Running:
    """Engine-thread state of one request in the decode batch."""

    handle: RequestHandle
    detok: Detokenizer
    generator: torch.Generator
    last_token: int
    length: int  # real (unpadded) tokens in the cache for this row
    output: list[int] = dataclasses.field(default_factory=list)
    seen: set[int] = dataclasses.field(default_factory=set)
    counts: torch.Tensor | None = None


class Engine:
    """Owns one loaded model and runs all generation for it on a single background thread."""

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 32, max_active: int = 256,
                 prefill_chunk: int = 512) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_active = max_active  # running + waiting; beyond it submit() raises EngineOverloaded
        self._active = 0
        self.prefill_chunk = prefill_chunk
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._waiting: list[RequestHandle] = []
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._ids = itertools.count(1)
        self._closed = False
        self._vocab_limit = len(loaded.tokenizer)
        # transformers 5.x renamed ``past_key_values`` to ``cache``; accept both releases
        params = inspect.signature(loaded.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._prefilling: RequestHandle | None = None
        self._install_cancel_hooks()
        self._thread = threading.Thread(target=self._loop, name=f"llama-lab-engine-{loaded.name}", daemon=True)
        self._thread.start()
        # An engine left open at interpreter exit would be torn down mid-wait by torch's thread
        # pools ("terminate called without an active exception", exit code 134): close it first.
        ref = weakref.ref(self)
        self._atexit = lambda: (engine := ref()) is not None and engine.close(timeout=2)
        atexit.register(self._atexit)

    # ------------------------------------------------------------ public API

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[Delta], None]) -> RequestHandle:
        """Queue a request; ``sink`` is called from the engine thread with each Delta."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        limit = self.loaded.context_length
        if len(prompt_ids) >= limit:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length is {limit} tokens")
        handle = RequestHandle(next(self._ids), list(prompt_ids), params, sink)
        handle._engine_steps = lambda: self.stats.steps
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if self._active >= self.max_active:
                raise EngineOverloaded(f"the server is busy: {self._active} requests are running or waiting "
                                       f"(limit {self.max_active}); try again shortly")
            self._active += 1
            self._waiting.append(handle)
            self.stats.waiting = len(self._waiting)
            self._cond.notify()
        return handle

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Delta]:
        """Blocking iterator of deltas; closing it early cancels the request."""
        events: "queue.SimpleQueue[Delta]" = queue.SimpleQueue()
        handle = self.submit(prompt_ids, params, events.put)
        try:
            while True:
                delta = events.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            handle.cancel()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        """The stream, collected."""
        return collect(self.stream(prompt_ids, params), time.perf_counter())

    def chat(self, messages: Sequence[Any], **params: Any) -> str:
        """Convenience for notebooks: the assistant's answer to ``messages``."""
        return self.generate(self.loaded.chat_prompt_ids(messages), SamplingParams(**params)).text

    def call(self, fn: Callable[[], Any]) -> "concurrent.futures.Future[Any]":
        """Run ``fn`` on the engine thread between steps: the model is never used by two threads."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self._calls.append((fn, fut))
            self._cond.notify()
        return fut

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; waiting and running requests end with finish_reason 'cancelled'."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        for hook in self._hooks:  # the model may outlive this engine (notebooks, tests)
            hook.remove()
        self._hooks = []
        atexit.unregister(self._atexit)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Engine({self.loaded.name!r}, running={self.stats.running}, waiting={self.stats.waiting}, "
                f"steps={self.stats.steps}, max_batch_size={self.max_batch_size})")

    # ------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        batch: list[_Running] = []
        cache: Any = None
        mask: torch.Tensor | None = None
        try:
            while True:
                with self._cond:
                    while not (self._closed or self._waiting or self._calls or batch):
                        self._cond.wait()
                    if self._closed:
                        break
                    calls, self._calls = self._calls, []
                    room = self.max_batch_size - len(batch)
                    admitted, self._waiting = self._waiting[:room], self._waiting[room:]
                    self.stats.waiting = len(self._waiting)
                for fn, fut in calls:
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as exc:  # handed to the caller, not raised here
                            fut.set_exception(exc)
                for handle in admitted:
                    try:
                        joined = self._prefill(handle)
                    except Exception as exc:  # one bad prompt (e.g. out of memory) fails alone
                        logger.exception("prefill failed for request %s", handle.id)
                        self._finish(handle, [], "error", error=str(exc))
                        continue
                    if joined is not None:
                        run, row_cache = joined
                        batch, cache, mask = _merge(batch, cache, mask, run, row_cache)
                had_work = bool(batch)
                batch, cache, mask = self._drop_finished(batch, cache, mask)
                self.stats.running = len(batch)
                if had_work and not batch:
                    _release_freed_memory()
                if batch:
                    try:
                        batch, cache, mask = self._decode_step(batch, cache, mask)
                    except Exception as exc:  # a broken step fails its batch, not the engine
                        logger.exception("decode step failed")
                        for run in batch:
                            self._finish(run.handle, run.output, "error", error=str(exc))
                        batch, cache, mask = [], None, None
        finally:
            with self._cond:
                self._closed = True
                pending, self._waiting = self._waiting, []
                calls, self._calls = self._calls, []
            for run in batch:
                self._finish(run.handle, run.output, "cancelled")
            for handle in pending:
                self._finish(handle, [], "cancelled")
            for _, fut in calls:
                fut.cancel()

    def _install_cancel_hooks(self) -> None:
        """Let a cancel interrupt a prefill forward pass between decoder layers.

        A long prompt's chunk can take a second on a CPU; checking only between chunks would
        leave the device busy that long after the client left.
        """
        decoder = getattr(self.loaded.model, "model", None)
        self._hooks = [layer.register_forward_pre_hook(self._check_prefill_cancel)
                       for layer in getattr(decoder, "layers", ())]

    def _check_prefill_cancel(self, module: Any, args: Any) -> None:
        handle = self._prefilling
        if handle is not None and handle.cancelled.is_set():
            raise _PrefillCancelled

    @torch.inference_mode()
    def _prefill(self, handle: RequestHandle) -> tuple[_Running, Any] | None:
        """Run the prompt through the model in chunks; sample the first token."""
        from transformers import DynamicCache

        if handle.cancelled.is_set():
            self._finish(handle, [], "cancelled")
            return None
        model, ids = self.loaded.model, handle.prompt_ids
        cache = DynamicCache(config=model.config)
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            if handle.cancelled.is_set():  # a client that leaves during a long prefill
                self._finish(handle, [], "cancelled")
                return None
            chunk = torch.tensor([ids[start:start + self.prefill_chunk]], device=self.loaded.device)
            self._prefilling = handle
            try:
                out = model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
            except _PrefillCancelled:
                self._finish(handle, [], "cancelled")
                return None
            finally:
                self._prefilling = None
            logits = out.logits[:, -1, :]
            self.stats.prefill_chunks += 1
        self.stats.prompt_tokens += len(ids)
        p = handle.params
        gen = torch.Generator(device="cpu")
        gen.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        run = _Running(handle=handle, detok=Detokenizer(self.loaded.tokenizer, ids, p.stop), generator=gen,
                       last_token=-1, length=len(ids), seen=set(ids) if p.repetition_penalty != 1.0 else set())
        self._accept(run, logits[0])
        if handle.done.is_set():
            return None
        return run, cache

    @torch.inference_mode()
    def _decode_step(self, batch: list[_Running], cache: Any, mask: torch.Tensor | None):
        dev = self.loaded.device
        tokens = torch.tensor([[r.last_token] for r in batch], device=dev)
        positions = torch.tensor([[r.length] for r in batch], device=dev)
        if mask is not None:
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=dev)], dim=1)
        out = self.loaded.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                                use_cache=True, **{self._cache_kw: cache})
        self.stats.steps += 1
        step = self.stats.steps
        logits = out.logits[:, -1, :]
        greedy_ids = None
        if all(r.handle.params.greedy and not r.handle.params.penalized and not r.handle.params.logprobs for r in batch):
            greedy_ids = torch.argmax(logits[:, : self._vocab_limit], dim=-1).tolist()
        for i, run in enumerate(batch):
            run.length += 1
            run.handle.steps_run += 1
            run.handle.last_step = step
            self._accept(run, logits[i], greedy_ids[i] if greedy_ids is not None else None)
        return batch, cache, mask  # the cache grew in place

    def _accept(self, run: _Running, logits: torch.Tensor, token: int | None = None) -> None:
        """Choose the next token for one request, emit its text, decide whether it is finished."""
        p, handle = run.handle.params, run.handle
        entry = None
        if token is None:
            raw = logits[: self._vocab_limit].float()
            scores = raw.clone() if p.penalized else raw
            if p.penalized:
                if run.counts is None:
                    run.counts = torch.zeros_like(raw)
                seen = torch.tensor(sorted(run.seen), dtype=torch.long, device=raw.device)
                scores = apply_penalties(scores, seen, run.counts, p)
            token = sample_row(scores, p, run.generator)
            if p.logprobs:
                entry = token_logprobs(raw, token, p.top_logprobs, self.loaded.tokenizer)
        run.last_token = token
        is_stop = token in self.loaded.stop_token_ids and not p.ignore_eos
        if not is_stop:
            run.output.append(token)
            if run.counts is not None:
                run.counts[token] += 1
            if p.repetition_penalty != 1.0:
                run.seen.add(token)
        self.stats.completion_tokens += 1
        text = "" if is_stop else run.detok.add(token)
        finish = None
        if is_stop or run.detok.stopped:
            finish = "stop"
        elif len(run.output) >= p.max_tokens or run.length + 1 >= self.loaded.context_length:
            finish = "length"
        if finish:
            text += run.detok.flush()
        if text or finish or entry:
            handle._sink(Delta(text=text, token_ids=[] if is_stop else [token], finish_reason=finish,
                               logprobs=[entry] if entry else [], prompt_tokens=len(handle.prompt_ids),
                               completion_tokens=len(run.output)))
        if finish:
            self._mark_done(handle, finish)

    def _drop_finished(self, batch: list[_Running], cache: Any, mask: torch.Tensor | None):
        """Remove finished and cancelled rows before the next forward pass."""
        keep = []
        for i, run in enumerate(batch):
            if run.handle.done.is_set():
                continue
            if run.handle.cancelled.is_set():
                self._finish(run.handle, run.output, "cancelled")
                continue
            keep.append(i)
        if len(keep) == len(batch):
            return batch, cache, mask
        if not keep:
            return [], None, None
        index = torch.tensor(keep, device=self.loaded.device)
        batch = [batch[i] for i in keep]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        if mask is not None:
            mask = mask[index]
            lead = int((mask.sum(0) == 0).long().cumprod(0).sum())  # columns padded in every row
            if lead:
                mask = mask[:, lead:]
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            if bool(mask.all()):
                mask = None
        return batch, cache, mask

    def _finish(self, handle: RequestHandle, output: list[int], reason: str, error: str | None = None) -> None:
        if handle.done.is_set():
            return
        handle._sink(Delta(text="", token_ids=[], finish_reason=reason, prompt_tokens=len(handle.prompt_ids),
                           completion_tokens=len(output), error=error))
        self._mark_done(handle, reason)

    def _mark_done(self, handle: RequestHandle, reason: str) -> None:
        handle.done.set()
        with self._cond:
            self._active -= 1
        if reason == "cancelled":
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1


def _merge(batch: list[_Running], cache: Any, mask: torch.Tensor | None, run: _Running, row_cache: Any):
    """Join a freshly prefilled request to the running batch, left-padding the shorter side."""
    if not batch:
        return [run], row_cache, None
    t_old, t_new = cache.get_seq_length(), row_cache.get_seq_length()
    t = max(t_old, t_new)
    dev = row_cache.layers[0].keys.device
    if mask is None:
        mask = torch.ones((len(batch), t_old), dtype=torch.long, device=dev)
    new_mask = torch.ones((1, t_new), dtype=torch.long, device=dev)
    mask = torch.cat([_left_pad(mask, t), _left_pad(new_mask, t)], dim=0)
    for old, new in zip(cache.layers, row_cache.layers):
        old.keys = torch.cat([_left_pad(old.keys, t, dim=2), _left_pad(new.keys, t, dim=2)], dim=0)
        old.values = torch.cat([_left_pad(old.values, t, dim=2), _left_pad(new.values, t, dim=2)], dim=0)
    return [*batch, run], cache, mask


def _release_freed_memory() -> None:
    """Hand freed KV-cache memory back to the OS when the batch empties (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _left_pad(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def collect(deltas: Iterator[Delta], started: float) -> Completion:
    """Drain a stream into one Completion (the non-streaming answer is the stream, collected)."""
    text, ids, logprobs = [], [], []
    first = None
    last = Delta("", [])
    for delta in deltas:
        if first is None and (delta.text or delta.token_ids):
            first = time.perf_counter() - started
        text.append(delta.text)
        ids.extend(delta.token_ids)
        logprobs.extend(delta.logprobs)
        last = delta
    if last.finish_reason == "error":
        raise RuntimeError(f"generation failed: {last.error}")
    return Completion(text="".join(text), token_ids=ids, finish_reason=last.finish_reason or "cancelled",
                      prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                      logprobs=logprobs, first_token_s=first, total_s=time.perf_counter() - started)
