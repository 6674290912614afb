"""Runs ``FastLlama`` over the paged KV cache: eager prompt chunks, compiled decode steps.

The decode step is ``torch.compile``d once with a dynamic token count, so one graph serves every
batch size (on the CPU up to ``CPU_COMPILED_MAX_ROWS`` rows; bigger batches decode eagerly): on the
CPU with inductor's weight freezing and its C++ GEMM templates (the weights are pre-packed once; a
one-token matrix-vector product streams them near the memory bandwidth), and on other devices with
inductor's default. A batch of one is padded with a scratch row to two tokens
(torch.compile treats sizes 0 and 1 as constants, which would mean a second graph and a second copy
of the packed weights). Prompts run eagerly in chunks: their big matrix products are fast without
compilation, and the eager loop can stop between layers when a client leaves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from llama_lab.engine.attention import cpu_kernel
from llama_lab.engine.kv_cache import SCRATCH_BLOCK, CacheShape, PagedKVCache, plan_blocks
from llama_lab.engine.llama import FastLlama, PrefillCancelled, Step, unsupported_reason

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 64
# Inductor's C++ GEMM template for bf16 on CPUs without AMX converts the weights to fp32 in registers:
# unbeatable for one to four rows (bandwidth-bound), compute-bound beyond. Measured on this CPU with
# SmolLM2: 10-11 ms per step for 1-4 rows compiled, 43 ms for 8 and 82 for 16; eager with oneDNN-packed
# weights (cpu_linear.py) 22, 23 and 28 ms for 4, 8 and 16. So bigger CPU batches decode eagerly; no second
# graph (and no second packed copy).
CPU_COMPILED_MAX_ROWS = 4


@dataclasses.dataclass
class SeqCache:
    """One request's place in the cache: its blocks and how many tokens they hold."""

    blocks: list[int]
    length: int = 0


@dataclasses.dataclass
class PrefillJob:
    """A chunk of one prompt: ``tokens`` go to positions ``seq.length ...``."""

    seq: SeqCache
    tokens: Sequence[int]
    want_logits: bool  # the chunk ends the prompt: its last token's logits pick the first output token


def compile_options(device: torch.device) -> dict[str, Any]:
    """Inductor options: frozen, pre-packed weights and C++ GEMM templates on the CPU.

    Only the C++ templates are offered (no timing contest against oneDNN): they won every decode
    shape measured on a quiet machine, and a contest timed on a busy one picked oneDNN for some
    layers and cached that choice for good (the step went from 13.7 to 18-26 ms).
    """
    if device.type == "cpu":
        return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}
    return {}


def _apply_compile_options(options: dict[str, Any]) -> None:
    """Set inductor's options on the calling thread (the engine's), where the step is compiled.

    Inductor's settings are per thread, and ``torch.compile(options=...)`` does not turn weight
    freezing on (measured: the weights stayed graph inputs, no packed constants); set here, on the
    compiling thread, they do.
    """
    import torch._inductor.config as inductor_config

    for key, value in options.items():
        setattr(inductor_config, key, value)


def _use_persistent_compile_cache() -> None:
    """Keep inductor's generated C++ kernels beside the converted models rather than in /tmp.

    The compiled graph itself is not cached: it holds oneDNN-packed weights, which inductor cannot
    pickle (its log: "Bypassing FX Graph Cache because 'mkldnn tensors unpickleable'"), so every start
    compiles; the kernels it builds on the way are reused (measured: 80 s cold, 66 s warm for SmolLM2).
    Torch writes its own default into ``TORCHINDUCTOR_CACHE_DIR`` the first time anything asks for
    the cache dir, so that value counts as unset; a value the user chose is kept.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        from llama_lab.model.loading import cache_root

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")


def _no_room_to_compile(model: nn.Module, device: torch.device) -> str | None:
    """Why the decode step must not be compiled for lack of memory, or None.

    On a CPU, inductor's freezing keeps a packed copy of every weight beside the model's own, so an
    8B model in bf16 (16 GB) would need 32 GB; refuse when the copy would take over half of the
    memory that is free now, rather than let the start-up be killed.
    """
    if device.type != "cpu":
        return None
    import psutil

    seen: set[int] = set()
    need = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            need += p.numel() * p.element_size()
    free = psutil.virtual_memory().available
    if need > 0.5 * free:
        return (f"the compiled step's packed copy of the weights ({need / 2**30:.1f} GiB) would take over half "
                f"of the free memory ({free / 2**30:.1f} GiB)")
    return None


class PagedRunner:
    """The model, its KV cache and the (compiled) step functions, used only from the engine thread."""

    def __init__(self, loaded: Any, *, max_batch_size: int, compile: bool, kv_cache_tokens: int = 0,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        reason = unsupported_reason(loaded.model)
        if reason:
            raise ValueError(reason)
        self.device = torch.device(loaded.device)
        kernel = cpu_kernel() if self.device.type == "cpu" else None
        self.model = FastLlama(loaded.model, kernel)
        self.attention = "cpu-kernel" if kernel is not None else "torch-reference"
        m = self.model
        packed = 0
        if self.device.type == "cpu" and os.environ.get("LLAMA_LAB_CPU_PACK", "1") != "0":
            packed = m.pack_cpu_linears()
        self.eager_linears = f"onednn-packed ({packed} weights)" if packed else "torch"
        shape = CacheShape(layers=len(m.layers), kv_heads=m.num_kv_heads, head_dim=m.head_dim, block_size=block_size,
                           dtype=m.embed.dtype)
        blocks = plan_blocks(shape, self.device, requested_tokens=kv_cache_tokens, max_batch_size=max_batch_size,
                             context_length=loaded.context_length)
        self.cache = PagedKVCache(shape, blocks, self.device, zero=kernel is None)
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.compile_requested = compile
        self.compiled: Any = None
        self.compile_seconds: float | None = None
        self.compile_error: str | None = None
        no_room = _no_room_to_compile(m, self.device) if compile and not m.quantized else None
        if compile and m.quantized:
            logger.info("bitsandbytes layers run eagerly (torch.compile does not trace them)")
        elif no_room:
            self.compile_error = no_room
            logger.warning("not compiling the decode step: %s; decoding eagerly", no_room)
        elif compile:
            _use_persistent_compile_cache()
            self.compiled = torch.compile(m, dynamic=False, fullgraph=True)

    @property
    def mode(self) -> str:
        if self.compiled is None:
            return "eager"
        return f"compiled (up to {CPU_COMPILED_MAX_ROWS} rows; eager beyond)" if self.device.type == "cpu" else "compiled"

    # ---------------------------------------------------------------- cache bookkeeping

    def reserve(self, tokens: int) -> SeqCache | None:
        blocks = self.cache.allocate(tokens)
        return SeqCache(blocks) if blocks is not None else None

    def release(self, seq: SeqCache) -> None:
        self.cache.release(seq.blocks)
        seq.blocks = []

    def _table(self, seqs: Sequence[SeqCache], positions: Sequence[int], pad_rows: int) -> torch.Tensor:
        """Block tables wide enough for the furthest position, at least two columns (see the module doc)."""
        width = max(2, max(p // self.block_size for p in positions) + 1)
        rows = [(s.blocks + [SCRATCH_BLOCK] * width)[:width] for s in seqs]
        rows += [[SCRATCH_BLOCK] * width] * pad_rows
        return torch.tensor(rows, dtype=torch.int32)

    def _to_device(self, step: Step) -> Step:
        if self.device.type == "cpu":
            return step
        return Step(*(t.to(self.device, non_blocking=True) for t in step.tensors()))

    # ---------------------------------------------------------------- steps

    @torch.inference_mode()
    def decode(self, seqs: Sequence[SeqCache], tokens: Sequence[int]) -> torch.Tensor:
        """One token for each sequence: logits ``[len(seqs), vocab]`` (float32, on the device)."""
        n = len(seqs)
        positions = [s.length for s in seqs]
        pad = max(0, 2 - n)
        all_pos = positions + [0] * pad
        bs = self.block_size
        step = Step(
            tokens=torch.tensor(list(tokens) + [0] * pad, dtype=torch.long),
            positions=torch.tensor(all_pos, dtype=torch.long),
            rows=torch.arange(n + pad, dtype=torch.long),
            blocks=torch.tensor([s.blocks[p // bs] for s, p in zip(seqs, positions)] + [SCRATCH_BLOCK] * pad,
                                dtype=torch.long),
            offsets=torch.tensor([p % bs for p in all_pos], dtype=torch.long),
            block_tables=self._table(seqs, all_pos, pad),
            logit_rows=torch.arange(n + pad, dtype=torch.long),
        )
        logits = self._run_decode(self._to_device(step))
        for s in seqs:
            s.length += 1
        return logits[:n]

    def _run_decode(self, step: Step) -> torch.Tensor:
        args = (*step.tensors(), self.cache.k, self.cache.v)
        rows = step.tokens.shape[0]
        if self.compiled is None or (self.device.type == "cpu" and rows > CPU_COMPILED_MAX_ROWS):
            return self.model(*args)
        for t in (step.tokens, step.positions, step.rows, step.blocks, step.offsets, step.logit_rows):
            torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(step.block_tables, 0)
        torch._dynamo.mark_dynamic(step.block_tables, 1)
        return self.compiled(*args)

    @torch.inference_mode()
    def prefill(self, jobs: Sequence[PrefillJob], cancelled: Callable[[], bool]) -> torch.Tensor | None:
        """Prompt chunks of several sequences in one forward; the logits of the jobs that end a prompt.

        Raises ``PrefillCancelled`` (between layers) when ``cancelled()`` turns true.
        """
        tokens: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        logit_rows: list[int] = []
        segments = []
        for r, job in enumerate(jobs):
            start = job.seq.length
            segments.append((r, len(tokens), len(job.tokens), start))
            tokens.extend(job.tokens)
            positions.extend(range(start, start + len(job.tokens)))
            rows.extend([r] * len(job.tokens))
            if job.want_logits:
                logit_rows.append(len(tokens) - 1)
        bs = self.block_size
        seqs = [job.seq for job in jobs]
        step = Step(
            tokens=torch.tensor(tokens, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            rows=torch.tensor(rows, dtype=torch.long),
            blocks=torch.tensor([seqs[r].blocks[p // bs] for r, p in zip(rows, positions)], dtype=torch.long),
            offsets=torch.tensor([p % bs for p in positions], dtype=torch.long),
            block_tables=self._table(seqs, positions, 0),
            logit_rows=torch.tensor(logit_rows, dtype=torch.long),
        )
        logits = self.model.prefill(self._to_device(step), self.cache.k, self.cache.v, segments, cancelled)
        for job in jobs:
            job.seq.length += len(job.tokens)
        return logits if logit_rows else None

    def warm_up(self) -> float:
        """Compile (or load from inductor's cache) and run the decode step once; seconds spent.

        Call it on the thread that will decode (the engine's): that is where the compile options
        apply. Uses only the scratch block, so it leaves no trace in the cache. A compile failure
        is logged and the runner falls back to eager decoding.
        """
        started = time.perf_counter()
        if self.compiled is not None:
            _apply_compile_options(compile_options(self.device))
            logger.info("compiling the decode step (about a minute for a small model on 2 cores, at every start; "
                        "kernels cached in %s; --no-compile skips it)", os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        scratch = [SeqCache([SCRATCH_BLOCK] * 4, length=i) for i in range(3)]
        try:
            for _ in range(2):
                self.decode(scratch, [0] * len(scratch))
                for s in scratch:
                    s.length = 0
        except Exception as exc:  # inductor or a compiler missing: serve eagerly rather than not at all
            if self.compiled is None:
                raise
            self.compile_error = f"{type(exc).__name__}: {exc}"
            logger.warning("torch.compile failed (%s); decoding eagerly", self.compile_error.splitlines()[0])
            self.compiled = None
            self.decode(scratch[:1], [0])
        self.compile_seconds = time.perf_counter() - started
        logger.info("decode step ready (%s, attention: %s) in %.1f s", self.mode, self.attention, self.compile_seconds)
        return self.compile_seconds


__all__ = ["PagedRunner", "PrefillCancelled", "PrefillJob", "SeqCache"]
