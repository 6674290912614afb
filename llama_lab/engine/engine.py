"""The generation engine: one thread owns the model and decodes every running request together.

Each loop turn: admit waiting requests while the batch and the KV cache have room (a request
reserves its prompt plus ``max_tokens`` up front, so a running request never waits for memory),
run one prefill chunk (up to ``prefill_chunk`` prompt tokens, from one or more prompts), then one
decode step for every running request. A long prompt therefore never stalls the streams already
running. Sampling runs for the whole batch on the model's device; each request keeps its own
parameters and seeded generator. A cancelled request is dropped before the next forward pass, so
it costs at most the step already running; a prompt being prefilled stops between layers. When
nothing is queued the thread sleeps on a condition variable: an idle server uses no CPU.

The model work is done by a runner: ``PagedRunner`` (``FastLlama`` over a paged KV cache, decode
compiled) for Llama-family models, ``HFRunner`` (the model's own forward) for anything else.

The one streaming generator (``stream``, or ``submit`` with a sink) is the only way out; ``generate``
drains it. The server's asyncio glue lives in ``llama_lab.server.generation``.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import queue
import secrets
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch

from llama_lab.engine.detokenizer import Detokenizer
from llama_lab.engine.llama import PrefillCancelled, unsupported_reason
from llama_lab.engine.runner import PrefillJob, Runner
from llama_lab.engine.sampling import (RowState, SamplingParams, advance_grammars, choose_tokens, logprob_entries,
                                       record_tokens)
from llama_lab.engine.threads import engine_policy, name_current_thread
from llama_lab.model.loading import LoadedModel
from llama_lab.profiling import release_freed_memory

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Delta", "Completion", "RequestHandle", "EngineOverloaded", "EngineClosed"]


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the server maps this to 429."""


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
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache


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
    prompt_tokens_cached: int = 0  # prompt tokens whose keys and values came from the prefix cache
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


@dataclasses.dataclass(eq=False)
class _Seq:
    """Engine-thread state of one admitted request."""

    handle: RequestHandle
    cache: Any  # the runner's per-sequence state (SeqCache / HFSeq)
    detok: Detokenizer
    sampler: RowState
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of which the prefix cache held at admission
    last_token: int = -1
    output: list[int] = dataclasses.field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.handle.prompt_ids) + len(self.output)


def make_runner(loaded: LoadedModel, *, max_batch_size: int, compile: bool, kv_cache_tokens: int = 0,
                prefix_caching: bool = True, compile_in_background: bool = False) -> Runner:
    """``PagedRunner`` where ``FastLlama`` covers the model, else the transformers fallback."""
    from llama_lab.engine.hf_runner import HFRunner
    from llama_lab.engine.paged_runner import PagedRunner

    reason = unsupported_reason(loaded.model)
    if reason is None:
        return PagedRunner(loaded, max_batch_size=max_batch_size, compile=compile, kv_cache_tokens=kv_cache_tokens,
                           prefix_caching=prefix_caching, compile_in_background=compile_in_background)
    logger.warning("%s: %s; using the transformers forward (slower)", loaded.name, reason)
    return HFRunner(loaded)


def default_compile() -> bool:
    """Compile unless ``LLAMA_LAB_COMPILE`` says no (the same variable as the server's ``--no-compile``)."""
    return os.environ.get("LLAMA_LAB_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


class Engine:
    """Owns one loaded model and runs all generation for it on a single background thread.

    All model work happens on that thread. Other torch work in the process should go through
    ``call(fn)`` too: a second thread running torch on the CPU gets its own OpenMP team, and on a
    machine with few cores two teams slow each other (the decode step ~2-3x, measured on 2 cores).

    ``compile`` (default: on, unless ``LLAMA_LAB_COMPILE=0``) compiles the decode step at
    construction; the constructor returns when it is ready, so warm-up happens at load and never
    inside the first request. ``compile=False`` starts at once and decodes eagerly. With
    ``compile_in_background`` a CPU package that is not in the cache yet is built by another process
    while the engine already decodes eagerly; it switches to the package between two steps.
    """

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 32, max_active: int = 256,
                 prefill_chunk: int = 512, compile: bool | None = None, kv_cache_tokens: int = 0,
                 prefix_caching: bool = True, threads: int = 0, compile_in_background: bool = False) -> None:
        if compile is None:
            compile = default_compile()
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_active = max_active  # running + waiting; beyond it submit() raises EngineOverloaded
        self.prefill_chunk = prefill_chunk
        self.stats = EngineStats()
        self._active = 0
        self._cond = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._ids = itertools.count(1)
        self._closed = False
        self._vocab_limit = len(loaded.tokenizer)
        self.runner: Runner = None  # type: ignore[assignment]  # made on the engine thread
        self.warmup_seconds: float | None = None
        # The caller's torch count caps it (OpenMP's is per thread); 0 follows the machine (threads.py).
        self.thread_policy, self._os_thread_name = engine_policy(threads)
        self._thread = threading.Thread(target=self._loop, name=f"llama-lab-engine-{loaded.name}", daemon=True)
        self._thread.start()
        # An engine left open at interpreter exit would be torn down mid-wait by torch's thread
        # pools ("terminate called without an active exception", exit code 134): close it first.
        ref = weakref.ref(self)
        self._atexit = lambda: (engine := ref()) is not None and engine.close(timeout=2)
        atexit.register(self._atexit)
        try:  # on the engine thread: it is the model's only user (fusing weights and compiling included)
            self.runner = self.call(lambda: make_runner(loaded, max_batch_size=max_batch_size, compile=compile,
                                                        kv_cache_tokens=kv_cache_tokens, prefix_caching=prefix_caching,
                                                        compile_in_background=compile_in_background)).result()
            self.warmup_seconds = self.call(lambda: self.runner.warm_up(defer=self._between_steps)).result()
        except BaseException:
            self.close()
            raise

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

    def _between_steps(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the engine thread between steps, unless the engine has closed meanwhile."""
        try:
            self.call(fn)
        except EngineClosed:
            pass

    def describe(self) -> dict[str, Any]:
        """How the engine runs: runner, decode mode, attention, KV cache, warm-up time."""
        return {**self.runner.describe(),
                "warmup_seconds": None if self.warmup_seconds is None else round(self.warmup_seconds, 2),
                "threads": self.thread_policy.describe()}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; waiting and running requests end with finish_reason 'cancelled'."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        close = getattr(self.runner, "close", None) if self.runner is not None else None
        if close is not None:
            close()
        atexit.unregister(self._atexit)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Engine({self.loaded.name!r}, {getattr(self.runner, 'mode', 'starting')}, running={self.stats.running}, "
                f"waiting={self.stats.waiting}, steps={self.stats.steps}, max_batch_size={self.max_batch_size})")

    # ------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        name_current_thread(self._os_thread_name)  # before the first parallel region: the OpenMP team inherits it
        torch.set_num_threads(self.thread_policy.threads)
        prefilling: list[_Seq] = []
        running: list[_Seq] = []
        try:
            while True:
                with self._cond:
                    while not (self._closed or self._waiting or self._calls or prefilling or running):
                        self._cond.wait()
                    if self._closed:
                        break
                    calls, self._calls = self._calls, []
                for fn, fut in calls:
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as exc:  # handed to the caller, not raised here
                            fut.set_exception(exc)
                had_work = bool(prefilling or running)
                self._admit(prefilling, running)
                if prefilling or running:
                    self._follow_thread_policy()
                if prefilling:
                    self._prefill_step(prefilling, running)
                running[:] = self._drop_finished(running)
                self.stats.running = len(running) + len(prefilling)
                if running:
                    self._decode_step(running)
                elif had_work and not prefilling:
                    release_freed_memory()
                    self.thread_policy.pause()
        finally:
            with self._cond:
                self._closed = True
                pending, self._waiting = list(self._waiting), collections.deque()
                calls, self._calls = self._calls, []
            for seq in prefilling + running:
                self._finish(seq, "cancelled")
            for handle in pending:
                self._finish_unadmitted(handle, "cancelled")
            for _, fut in calls:
                fut.cancel()

    def _follow_thread_policy(self) -> None:
        """Run the policy's thread count (engine thread only: torch's count is per OS thread)."""
        threads = self.thread_policy.update()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def _admit(self, prefilling: list[_Seq], running: list[_Seq]) -> None:
        """Move waiting requests into the batch while there is room in it and in the KV cache."""
        while True:
            with self._cond:
                if not self._waiting or len(prefilling) + len(running) >= self.max_batch_size:
                    return
                handle = self._waiting[0]
                if handle.cancelled.is_set():
                    self._waiting.popleft()
                    self.stats.waiting = len(self._waiting)
                    cancelled = True
                else:
                    cancelled = False
            if cancelled:
                self._finish_unadmitted(handle, "cancelled")
                continue
            p = handle.params
            need = min(len(handle.prompt_ids) + p.max_tokens, self.loaded.context_length)
            cache = self.runner.reserve(need, handle.prompt_ids)
            if cache is None:
                return  # the head waits for blocks to come back (first come, first served)
            with self._cond:
                self._waiting.popleft()
                self.stats.waiting = len(self._waiting)
            try:
                sampler = RowState(p, handle.prompt_ids, self._vocab_limit, self.runner.device,
                                   p.seed if p.seed is not None else secrets.randbits(63))
            except Exception as exc:
                self.runner.release(cache)
                self._finish_unadmitted(handle, "error", str(exc))
                continue
            cached = getattr(cache, "length", 0)  # prompt tokens the prefix cache already holds
            self.stats.prompt_tokens_cached += cached
            prefilling.append(_Seq(handle=handle, cache=cache, sampler=sampler, prefilled=cached, cached=cached,
                                   detok=Detokenizer(self.loaded.tokenizer, handle.prompt_ids, p.stop)))

    def _prefill_step(self, prefilling: list[_Seq], running: list[_Seq]) -> None:
        """One chunk of prompt tokens (from one or more prompts, first come first served)."""
        for seq in [s for s in prefilling if s.handle.cancelled.is_set()]:
            prefilling.remove(seq)
            self._finish(seq, "cancelled")
        if not prefilling:
            return

        budget, jobs, members = self.prefill_chunk, [], []
        for seq in prefilling:
            if budget <= 0:
                break
            ids = seq.handle.prompt_ids
            take = ids[seq.prefilled:seq.prefilled + budget]
            budget -= len(take)
            jobs.append(PrefillJob(seq=seq.cache, tokens=take, want_logits=seq.prefilled + len(take) == len(ids)))
            members.append(seq)
        try:
            logits = self.runner.prefill(jobs, lambda: all(s.handle.cancelled.is_set() for s in members))
        except PrefillCancelled:
            for seq in members:
                prefilling.remove(seq)
                self._finish(seq, "cancelled")
            return
        except Exception as exc:  # one bad prompt (e.g. out of memory) fails its chunk, not the engine
            logger.exception("prefill failed")
            for seq in members:
                prefilling.remove(seq)
                self._finish(seq, "error", str(exc))
            return
        self.stats.prefill_chunks += 1
        done = []
        for seq, job in zip(members, jobs):
            seq.prefilled += len(job.tokens)
            if job.want_logits:
                done.append(seq)
                self.stats.prompt_tokens += len(seq.handle.prompt_ids)
        if done:
            assert logits is not None
            for seq in done:
                prefilling.remove(seq)
            self._sample(done, logits)
            running.extend(s for s in done if not s.handle.done.is_set())

    def _decode_step(self, running: list[_Seq]) -> None:
        try:
            logits = self.runner.decode([s.cache for s in running], [s.last_token for s in running])
        except Exception as exc:  # a broken step fails its batch, not the engine
            logger.exception("decode step failed")
            for seq in running:
                self._finish(seq, "error", str(exc))
            running.clear()
            return
        self.stats.steps += 1
        step = self.stats.steps
        for seq in running:
            seq.handle.steps_run += 1
            seq.handle.last_step = step
        self._sample(running, logits)

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Choose every row's next token on the device; one copy of the ids to the host."""
        rows = [s.sampler for s in seqs]
        raw = logits[:, : self._vocab_limit]
        try:
            tokens = choose_tokens(raw, rows)
            record_tokens(rows, tokens)
            entries = logprob_entries(raw, tokens, rows, self.loaded.tokenizer)
            ids = tokens.tolist()
            broken = advance_grammars(rows, ids, self.loaded.stop_token_ids)  # host work after the one sync
        except Exception as exc:
            logger.exception("sampling failed")
            for seq in seqs:
                self._finish(seq, "error", str(exc))
            return
        for seq, token, entry, error in zip(seqs, ids, entries, broken):
            if error is not None:
                self._finish(seq, "error", error)
                continue
            self._accept(seq, int(token), entry)

    def _accept(self, seq: _Seq, token: int, entry: dict[str, Any] | None) -> None:
        """Record one chosen token, emit its text, decide whether the request is finished."""
        p, handle = seq.handle.params, seq.handle
        seq.last_token = token
        is_stop = token in self.loaded.stop_token_ids and not p.ignore_eos
        if not is_stop:
            seq.output.append(token)
        self.stats.completion_tokens += 1
        text = "" if is_stop else seq.detok.add(token)
        finish = None
        if is_stop or seq.detok.stopped:
            finish = "stop"
        elif len(seq.output) >= p.max_tokens or seq.length + 1 >= self.loaded.context_length:
            finish = "length"
        if finish:
            text += seq.detok.flush()
        # every chosen token is delivered, also one that shows no text yet (a lone byte of a multi-byte
        # character, a tail held back as the possible start of a stop string): token ids and usage count it
        handle._sink(Delta(text=text, token_ids=[] if is_stop else [token], finish_reason=finish,
                           logprobs=[entry] if entry else [], prompt_tokens=len(handle.prompt_ids),
                           completion_tokens=len(seq.output), cached_tokens=seq.cached))
        if finish:
            self.runner.release(seq.cache)
            self._mark_done(handle, finish)

    def _drop_finished(self, running: list[_Seq]) -> list[_Seq]:
        """Remove finished and cancelled rows before the next forward pass."""
        keep = []
        for seq in running:
            if seq.handle.done.is_set():
                continue
            if seq.handle.cancelled.is_set():
                self._finish(seq, "cancelled")
                continue
            keep.append(seq)
        return keep

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        self.runner.release(seq.cache)
        if not seq.handle.done.is_set():
            seq.handle._sink(Delta(text="", token_ids=[], finish_reason=reason,
                                   prompt_tokens=len(seq.handle.prompt_ids), completion_tokens=len(seq.output),
                                   error=error, cached_tokens=seq.cached))
            self._mark_done(seq.handle, reason)

    def _finish_unadmitted(self, handle: RequestHandle, reason: str, error: str | None = None) -> None:
        if handle.done.is_set():
            return
        handle._sink(Delta(text="", token_ids=[], finish_reason=reason, prompt_tokens=len(handle.prompt_ids),
                           error=error))
        self._mark_done(handle, reason)

    def _mark_done(self, handle: RequestHandle, reason: str) -> None:
        handle.done.set()
        with self._cond:
            self._active -= 1
        if reason == "cancelled":
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1


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
