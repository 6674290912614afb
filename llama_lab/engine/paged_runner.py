"""Runs ``FastLlama`` over the paged KV cache: eager prompt chunks, compiled decode steps.

On the CPU the decode step is compiled ahead of time (``compiled_step.py``: torch.export and
AOTInductor with weight freezing and the C++ GEMM templates; the weights are pre-packed once and a
one-token matrix-vector product streams them near the memory bandwidth) and kept on disk, so only a
model's first start on a machine pays for it. It covers up to ``CPU_COMPILED_MAX_ROWS`` rows over float
weights, and the whole batch over packed quantized weights; bigger batches decode eagerly. Its package
declares a range of rows from one, so a single sequence runs unpadded. On other devices
``torch.compile`` (inductor's defaults) compiles it at every start with a dynamic token count, and a
batch of one is padded with a scratch row to two tokens (its tracer treats sizes 0 and 1 as constants,
which would mean a second graph). Prompts run eagerly in chunks: their big matrix products are fast
without compilation, and the eager loop can stop between layers when a client leaves.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from llama_lab.engine import compiled_step
from llama_lab.engine.background_build import BackgroundBuild
from llama_lab.engine.attention import cpu_kernel
from llama_lab.engine.kv_cache import SCRATCH_BLOCK, CacheShape, PagedKVCache, plan_blocks
from llama_lab.engine.llama import FastLlama, PrefillCancelled, Step, unsupported_reason
from llama_lab.engine.runner import PrefillJob, SeqCache
from llama_lab.kernels.build import kernel_path
from llama_lab.model.quant import batch_products

logger = logging.getLogger(__name__)

# Tokens per KV block, the prefix cache's grain: a prompt shares only whole blocks, so with 16 (vLLM's default) a
# resent prompt, a shared system prompt or a chat's next turn recomputes at most 15 of its cached tokens where
# 64 recomputed up to 63, and prompts under 64 tokens were never shared (16 short chat prompts resent: 249 ->
# 294 tok/s, AVX2 code). The attention kernels score 64 keys per softmax update across blocks, so a 4k prompt
# and decoding at 4k cost what they did with 64-token blocks.
DEFAULT_BLOCK_SIZE = 16
# Inductor's C++ GEMM template for bf16 on CPUs without AMX converts the weights to fp32 in registers:
# unbeatable for a few rows (bandwidth-bound), compute-bound beyond, where eager steps over oneDNN-packed
# weights (cpu_linear.py) win. So float weights compile for up to CPU_COMPILED_MAX_ROWS rows and bigger
# batches decode eagerly; no second graph (and no second packed copy). Packed quantized weights run our own
# kernels whatever the row count, so there the compiled step covers the whole batch and saves the eager
# step's per-op overhead (docs/engine.md has the step times).
CPU_COMPILED_MAX_ROWS = 4


def _use_persistent_compile_cache() -> None:
    """Keep inductor's generated C++ kernels beside the converted models rather than in /tmp.

    Torch writes its own default into ``TORCHINDUCTOR_CACHE_DIR`` the first time anything asks for
    the cache dir, so that value counts as unset; a value the user chose is kept.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        from llama_lab.model.loading import cache_root

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")


KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kv_cache_dtype(model: FastLlama, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: the activations', except for fp32 activations over packed weights on a CPU.

    There a step reads the cache as much as the weights at a few thousand tokens of context, so it is
    kept in 16 bits, as llama.cpp keeps its f16 cache: bf16 where the CPU computes with it natively,
    else fp16 (exact conversions with F16C). ``LLAMA_LAB_KV_DTYPE`` (fp32, fp16, bf16) overrides.
    """
    chosen = os.environ.get("LLAMA_LAB_KV_DTYPE", "auto").lower()
    if chosen in KV_DTYPES:
        return KV_DTYPES[chosen]
    if device.type == "cpu" and model.dtype == torch.float32 and model.packed_weights:
        from llama_lab.model.loading import cpu_has_fast_bf16

        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float16
    return model.dtype


def _weights_bytes(model: nn.Module) -> int:
    """Parameters and buffers (packed weights are buffers), each storage counted once."""
    seen: set[int] = set()
    total = 0
    for p in [*model.parameters(), *model.buffers()]:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _no_room_to_compile(model: nn.Module, device: torch.device) -> str | None:
    """Why the decode step must not be compiled for lack of memory, or None.

    On a CPU a step over float weights holds its own copy of them, twice over (packed for its GEMM, and
    plain: AOTInductor keeps every parameter it was given), beside the model's, so an 8B model in bf16
    (16 GB) would need 32 GB more. A step over packed quantized weights runs on the model's own tensors
    (``compiled_step.CompiledStep``), but building it still serializes a copy of them and, in the
    background, loads the model a second time. Refuse when that would take over half of the memory
    that is free now, rather than let the start-up be killed.
    """
    if device.type != "cpu":
        return None
    import psutil

    need = 2 * _weights_bytes(model)
    free = psutil.virtual_memory().available
    if need > 0.5 * free:
        return (f"the compiled step's copies of the weights ({need / 2**30:.1f} GiB) would take over half "
                f"of the free memory ({free / 2**30:.1f} GiB)")
    return None


class PagedRunner:
    """The model, its KV cache and the (compiled) step functions, used only from the engine thread."""

    def __init__(self, loaded: Any, *, max_batch_size: int, compile: bool, kv_cache_tokens: int = 0,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefix_caching: bool = True,
                 compile_in_background: bool = False) -> None:
        reason = unsupported_reason(loaded.model)
        if reason:
            raise ValueError(reason)
        self.device = torch.device(loaded.device)
        kernel = cpu_kernel() if self.device.type == "cpu" else None
        self.model = FastLlama(loaded.model, kernel)
        self.attention = "cpu-kernel" if kernel is not None else "torch-reference"
        self.kernel_path = kernel_path() if kernel is not None else None
        # the quantized kernels' GEMM for prompt chunks (read here, so a bad LLAMA_LAB_GEMM_DTYPE stops the start)
        self.prompt_gemm = torch.ops.llama_lab.gemm_dtype() if kernel is not None else None
        # and a decode batch's: bf16 tiles from a few rows where the CPU has AVX512-BF16, else int16 activations
        self.batch_products = batch_products() if kernel is not None else None
        m = self.model
        packed = 0
        if self.device.type == "cpu" and os.environ.get("LLAMA_LAB_CPU_PACK", "1") != "0":
            packed = m.pack_cpu_linears()
        self.eager_linears = f"onednn-packed ({packed} weights)" if packed else "torch"
        shape = CacheShape(layers=len(m.layers), kv_heads=m.num_kv_heads, head_dim=m.head_dim, block_size=block_size,
                           dtype=kv_cache_dtype(m, self.device))
        blocks = plan_blocks(shape, self.device, requested_tokens=kv_cache_tokens, max_batch_size=max_batch_size,
                             context_length=loaded.context_length)
        self.cache = PagedKVCache(shape, blocks, self.device, zero=kernel is None, prefix_caching=prefix_caching)
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.name = loaded.name
        self._loaded = loaded
        self.compile_requested = compile
        self.compile_in_background = compile_in_background
        self.background: BackgroundBuild | None = None  # the CPU's package being built by another process
        self._background_done = False  # its result was taken (switched to, or the failure recorded)
        # the most rows the CPU's compiled step takes (see CPU_COMPILED_MAX_ROWS)
        self.compiled_max_rows = max(2, max_batch_size) if m.packed_weights else CPU_COMPILED_MAX_ROWS
        self.compiled: Any = None  # a CompiledStep (CPU) or torch.compile's wrapper (other devices)
        self._compile_ahead = False  # the CPU's package is loaded or built in warm_up, on the engine thread
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
            if self.device.type == "cpu":
                self._compile_ahead = True
            else:
                self.compiled = torch.compile(m, dynamic=False, fullgraph=True)

    @property
    def mode(self) -> str:
        if self.compiled is None:
            if self.background is not None and not self._background_done:
                return "eager (the compiled step is being built in the background)"
            return "eager"
        if isinstance(self.compiled, compiled_step.CompiledStep):
            return f"compiled ahead of time (up to {self.compiled_max_rows} rows; eager beyond)"
        return "compiled"

    def describe(self) -> dict[str, Any]:
        return {"runner": type(self).__name__, "decode": self.mode, "attention": self.attention,
                "cpu_kernels": self.kernel_path, "prompt_gemm": self.prompt_gemm,
                "batch_products": self.batch_products,
                "eager_linears": self.eager_linears, "compile_error": self.compile_error,
                "compiled_package": self.package, "kv_cache_tokens": self.cache.capacity_tokens,
                "kv_cache_dtype": str(self.cache.shape.dtype).replace("torch.", ""),
                "kv_block_size": self.cache.shape.block_size, "prefix_caching": self.cache.pool.prefix_caching,
                "kv_cache_touched_mb": round(self.cache.touched_bytes / 2**20, 1)}

    @property
    def package(self) -> dict[str, Any] | None:
        """The CPU's compiled-step package: its path and whether this start reused it."""
        if not isinstance(self.compiled, compiled_step.CompiledStep):
            return None
        return {"path": str(self.compiled.path), "reused": self.compiled.reused,
                "shares_weights": self.compiled.shares_weights}

    # ---------------------------------------------------------------- cache bookkeeping

    def reserve(self, tokens: int, prompt: Sequence[int] = ()) -> SeqCache | None:
        """Room for ``tokens`` tokens, or None; ``length`` says how many of ``prompt`` are already in it.

        The prompt's last token is always computed (its logits choose the first output token), so
        at most the blocks before it are taken from the prefix cache.
        """
        got = self.cache.allocate(tokens, prompt[:-1])
        if got is None:
            return None
        blocks, cached = got
        return SeqCache(blocks, length=cached, tokens=list(prompt[:cached]))

    def release(self, seq: SeqCache) -> None:
        """Give the blocks back; the full ones stay cached under their tokens for later prompts."""
        self.cache.publish(seq.blocks, seq.tokens)
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

    def _decode_step(self, seqs: Sequence[SeqCache], tokens: Sequence[int]) -> Step:
        """The step tensors for one token per sequence; torch.compile's step takes at least two rows (see
        the module doc), so there a single one is padded with a scratch row."""
        n = len(seqs)
        positions = [s.length for s in seqs]
        pad = max(0, 2 - n) if self.compiled is not None and not isinstance(self.compiled, compiled_step.CompiledStep) \
            else 0
        all_pos = positions + [0] * pad
        bs = self.block_size
        return Step(
            tokens=torch.tensor(list(tokens) + [0] * pad, dtype=torch.long),
            positions=torch.tensor(all_pos, dtype=torch.long),
            rows=torch.arange(n + pad, dtype=torch.long),
            blocks=torch.tensor([s.blocks[p // bs] for s, p in zip(seqs, positions)] + [SCRATCH_BLOCK] * pad,
                                dtype=torch.long),
            offsets=torch.tensor([p % bs for p in all_pos], dtype=torch.long),
            block_tables=self._table(seqs, all_pos, pad),
            logit_rows=torch.arange(n + pad, dtype=torch.long),
        )

    @torch.inference_mode()
    def decode(self, seqs: Sequence[SeqCache], tokens: Sequence[int]) -> torch.Tensor:
        """One token for each sequence: logits ``[len(seqs), vocab]`` (float32, on the device)."""
        logits = self._run_decode(self._to_device(self._decode_step(seqs, tokens)))
        for s, t in zip(seqs, tokens):
            s.length += 1
            s.tokens.append(t)
        return logits[:len(seqs)]

    def _run_decode(self, step: Step) -> torch.Tensor:
        args = (*step.tensors(), self.cache.k, self.cache.v)
        rows = step.tokens.shape[0]
        if self.compiled is None or (self.device.type == "cpu" and rows > self.compiled_max_rows):
            return self.model(*args)
        if isinstance(self.compiled, compiled_step.CompiledStep):
            return self.compiled(*args)
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
            job.seq.tokens.extend(job.tokens)
            if job.want_logits:  # the whole prompt is in: requests arriving meanwhile can share its blocks
                self.cache.publish(job.seq.blocks, job.seq.tokens)
        return logits if logit_rows else None

    def warm_up(self, defer: Callable[[Callable[[], Any]], Any] | None = None) -> float:
        """Load or build the CPU's compiled step (or let torch.compile compile), run it once; seconds spent.

        Call it on the thread that will decode (the engine's). Uses only the scratch block, so it
        leaves no trace in the cache. A compile failure is logged and the runner decodes eagerly. With
        ``compile_in_background`` and a ``defer`` that runs a function on the engine thread between
        steps, a package that is not on disk yet is built by another process while the runner decodes
        eagerly, and swapped in through ``defer`` when it is ready.
        """
        started = time.perf_counter()
        if self._compile_ahead:
            m = self.model
            example = (*self._decode_step(self._scratch(), [0] * 3).tensors(), self.cache.k, self.cache.v)
            constants = (m.num_heads, m.num_kv_heads, m.head_dim, m.eps, m.scale, repr(m.act), self.attention,
                         self.block_size, str(self.cache.shape.dtype))
            try:
                path = compiled_step.package_path(m, name=self.name, shape_constants=constants,
                                                  max_rows=self.compiled_max_rows)
                if self.compile_in_background and defer is not None and not path.is_file():
                    self.background = BackgroundBuild(
                        self._loaded, path=path, max_batch_size=self.max_batch_size,
                        on_done=lambda ok, error: defer(lambda: self._adopt(ok, error)))
                else:
                    self.compiled = compiled_step.load_or_build(m, example, path=path, max_rows=self.compiled_max_rows,
                                                                weights_bytes=_weights_bytes(m))
            except Exception as exc:  # no C++ compiler, no room on disk, an export the model defeats
                self.compile_error = f"{type(exc).__name__}: {exc}"
                logger.warning("could not compile the decode step (%s); decoding eagerly",
                               self.compile_error.splitlines()[0])
        elif self.compiled is not None:
            logger.info("compiling the decode step (torch.compile, at every start; --no-compile skips it)")
        self._first_steps()
        self.compile_seconds = time.perf_counter() - started
        logger.info("decode step ready (%s, attention: %s) in %.1f s", self.mode, self.attention, self.compile_seconds)
        return self.compile_seconds

    def _scratch(self) -> list[SeqCache]:
        return [SeqCache([SCRATCH_BLOCK] * 4, length=i) for i in range(3)]

    def _first_steps(self) -> None:
        """Two steps on the scratch block: the compiled step's first call is slow, and a broken one shows here."""
        scratch = self._scratch()
        try:
            for _ in range(2):
                self.decode(scratch, [0] * len(scratch))
                for s in scratch:
                    s.length = 0
        except Exception as exc:  # inductor or a compiler missing: serve eagerly rather than not at all
            if self.compiled is None:
                raise
            self.compile_error = f"{type(exc).__name__}: {exc}"
            logger.warning("the compiled decode step failed (%s); decoding eagerly", self.compile_error.splitlines()[0])
            self.compiled = None
            self.decode(scratch[:1], [0])

    def _adopt(self, ok: bool, error: str | None) -> None:
        """On the engine thread, between steps: switch to the package the background build wrote."""
        assert self.background is not None
        step = None
        if ok:
            try:
                step = compiled_step.CompiledStep(self.background.path, reused=False, module=self.model)
            except Exception as exc:  # a package this runtime cannot load: stay eager
                error = f"{type(exc).__name__}: {exc}"
        if step is None:
            self.compile_error = error or "the background build failed"
            self._background_done = True
            logger.warning("the background build of the decode step failed (%s); decoding eagerly",
                           self.compile_error.splitlines()[0])
            return
        self.compiled, self._background_done = step, True
        self._first_steps()
        logger.info("switched to the compiled decode step (%s), built in the background in %.0f s", self.mode,
                    self.background.seconds or 0.0)

    def close(self) -> None:
        """Stop a background build that is still running (its half-written package is never published)."""
        if self.background is not None:
            self.background.stop()


__all__ = ["PagedRunner", "PrefillCancelled", "PrefillJob", "SeqCache"]
