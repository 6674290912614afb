"""The quantization table: what each load mode costs in memory, speed, energy and quality.

For every load mode (full, 8bit, 4bit, cpu on a GPU box; gguf, int8 and int4, the CPU kernels' modes,
on a CPU-only one) ``run_table`` loads the model in a fresh spawned
process (so each RSS figure is that mode's alone, not the sum of every mode loaded so far) and
measures load time, weights memory as the framework counts it next to the theoretical bytes,
device/process memory as nvidia-smi or the OS sees it, peak memory while generating, time to
first token, decode tokens/s at batch 1 and 8 (through the ``Engine``, 8 concurrent requests),
energy per token where a counter exists, perplexity on ``perplexity.txt`` (package data) and the greedy
answer to a fixed prompt.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import datetime
import importlib.metadata
import logging
import math
import multiprocessing
import os
import platform
import re
import statistics
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

from llama_lab.lab import data_file, round_or_none
from llama_lab.model.presets import ARCH_PRESETS, LoadMode
from llama_lab.profiling import Monitor, cpu_kind, peak_rss_bytes, reset_peak_rss

if TYPE_CHECKING:
    import pandas as pd

    from llama_lab.engine import Engine
    from llama_lab.model.loading import LoadedModel

logger = logging.getLogger(__name__)

PERPLEXITY_TEXT = data_file("perplexity.txt")
ANSWER_PROMPT = "What is the capital of France? Answer in one sentence."
# Eight different prompts so the batch-8 run pads and decodes like real concurrent chats.
DECODE_PROMPTS = [
    f"Write a long, detailed story about {topic}." for topic in
    ("a lighthouse keeper", "a lost robot", "a mountain village", "a river journey",
     "a night market", "an old clockmaker", "a desert caravan", "a winter garden")
]
WEIGHTS_TOLERANCE = 0.15  # the bar: framework weights memory within 15% of the theoretical bytes

# The modes run by the CPU kernels (model/quant.py): a GGUF's own blocks, and weight-only int8 / int4.
KERNEL_MODES = ("gguf", "int8", "int4")
# Bits one stored weight costs, by storage format. q4, q5 and q8 are the CPU kernels' layouts: per group of
# 32 weights, q4 holds 16 bytes of nibbles plus a float16 scale d and minimum m (160 bits), q5 that plus
# 4 bytes of fifth bits (192 bits), q8 32 bytes plus a float16 d (272 bits). bitsandbytes' own scales are
# left out, as get_memory_footprint leaves them.
FORMAT_BITS: dict[str, float] = {
    "float32": 32, "bfloat16": 16, "float16": 16, "bnb-int8": 8, "bnb-nf4": 4, "q8": 8.5, "q5": 6, "q4": 5,
}
KERNEL_GROUP = 32  # a linear whose input width is not a whole number of groups stays float32

# The 8B model's memory as the reference write-up measured it by hand (nvidia-smi, whole device; nvidia-smi's MB
# are MiB): printed beside the theoretical bytes, the figures a reader of that write-up compares against.
SEED_8B_MIB = {"full": 15708, "8bit": 9336, "4bit": 5744, "cpu": 0}


def default_modes(source: str = "default") -> tuple[str, ...]:
    """Every load mode that gives a row of its own for ``source`` on this machine.

    With a GPU: full, 8bit, 4bit and cpu. Without one, "cpu" loads what "full" loads (what "gguf"
    loads, for a GGUF file), so the CPU kernels' modes take its place: gguf (a GGUF source only),
    int8 and int4.
    """
    import torch

    if torch.cuda.is_available():
        return ("full", "8bit", "4bit", "cpu")
    return ("full", "8bit", "4bit") + (("gguf",) if gguf_file(source) else ()) + ("int8", "int4")


def gguf_file(source: str) -> Path | None:
    """The GGUF file ``source`` names ('default', a .gguf file, a folder holding only one), as the loader reads it."""
    from llama_lab.model.loading import embedded_gguf_path

    if source == "default":
        return embedded_gguf_path()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if len(ggufs) == 1 else None
    return None


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to measure and how long to spend on it; ``quick()`` is the CI/notebook variant."""

    source: str = "default"
    modes: tuple[str, ...] = ()  # empty: default_modes(source), filled in at construction
    decode_tokens: int = 64
    batch: int = 8
    answer_tokens: int = 48
    ppl_path: str = str(PERPLEXITY_TEXT)
    ppl_max_tokens: int = 512
    interval_s: float = 0.05
    repeats: int = 3  # timed runs per speed figure (median reported, spread shown), after a warm-up of the same shapes
    compile: bool | None = None  # the engine's default (compiled decode unless LLAMA_LAB_COMPILE=0)
    isolate: bool = True  # one spawned process per mode: honest RSS
    device: str | None = None
    dtype: str | None = None
    eager_modes: tuple[str, ...] = ()  # modes decoded eagerly whatever ``compile`` says

    def __post_init__(self) -> None:
        if not self.modes:
            object.__setattr__(self, "modes", default_modes(self.source))

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchSettings":
        """Short settings that finish in a few minutes on two CPU cores.

        The CPU kernels' modes decode eagerly here: each would otherwise build its own compiled decode
        step on an empty cache (~75 s apiece on two cores), and full keeps the compiled path's figure.
        """
        base = dict(decode_tokens=12, answer_tokens=24, ppl_max_tokens=128, eager_modes=KERNEL_MODES)
        return cls(**{**base, **overrides})

    def compile_for(self, mode: str) -> bool | None:
        """The engine's ``compile`` argument for ``mode``."""
        return False if LoadMode.parse(mode).value in self.eager_modes else self.compile


@dataclasses.dataclass(frozen=True)
class WeightInventory:
    """How many parameters a load mode stores in each format (``FORMAT_BITS``), from the model's inventory.

    bitsandbytes quantizes every ``nn.Linear`` except the output head; the embedding, the head (tied to
    it in SmolLM2), norms and biases stay in the compute dtype. The CPU kernels' int8/int4 store the
    decoder's linears as q8/q4 and the embedding and head as q8 (one table when tied); gguf keeps each
    tensor in the file's own type (Q4_0/Q4_1/Q4_K as q4, Q5_0/Q5_1/Q5_K as q5, other quantized types as
    q8). Both keep norms and biases in float32.
    """

    params_by_format: Mapping[str, int]

    @property
    def params(self) -> int:
        return sum(self.params_by_format.values())

    @property
    def quantized_params(self) -> int:
        return sum(n for fmt, n in self.params_by_format.items() if not _is_float(fmt))

    @property
    def theoretical_bytes(self) -> int:
        return round(sum(n * FORMAT_BITS[fmt] for fmt, n in self.params_by_format.items()) / 8)

    def describe(self) -> str:
        """``"q4 106.2M + q8 28.3M + float32 0.0M"``: the layout the theory assumes, largest first."""
        parts = sorted(self.params_by_format.items(), key=lambda kv: -kv[1])
        return " + ".join(f"{fmt} {n / 1e6:.1f}M" for fmt, n in parts if n)


def _is_float(fmt: str) -> bool:
    return fmt in ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class ModeResult:
    """One row of the table. Sizes in bytes; NaN where this machine cannot measure it."""

    mode: str
    model: str = ""
    source: str = ""
    random_weights: bool = False
    device: str = ""
    dtype: str = ""
    params: int = 0
    load_s: float = math.nan
    weights_bytes: int = 0  # model.get_memory_footprint(): what the framework holds
    theoretical_bytes: int = 0
    weights_vs_theory: float = math.nan  # weights_bytes / theoretical_bytes
    weights_within_tolerance: bool = False
    weights_layout: str = ""  # the theory's formats, e.g. "q4 106.2M + q8 28.3M + float32 0.0M"
    # GPU: absolute NVML figures (what nvidia-smi shows). CPU: growth over the RSS before the load.
    device_mem_bytes: float = math.nan  # after the load
    process_rss_bytes: float = math.nan  # absolute RSS after the load
    peak_mem_bytes: float = math.nan  # peak while generating (CPU: exact, from VmHWM)
    ttft_s: float = math.nan
    decode_tok_s_b1: float = math.nan  # median of `repeats` timed runs
    decode_tok_s_b1_min: float = math.nan
    decode_tok_s_b1_max: float = math.nan
    decode_tok_s_batch: float = math.nan  # aggregate over `batch` concurrent requests, median of `repeats`
    decode_tok_s_batch_min: float = math.nan
    decode_tok_s_batch_max: float = math.nan
    repeats: int = 0
    engine_decode: str = ""  # "compiled" / "eager": how the engine ran the decode step
    batch: int = 0
    batch_method: str = ""
    decode_tokens: int = 0
    energy_j_per_token: float = math.nan
    energy_source: str = "unavailable"
    monitor_backend: str = ""
    perplexity: float = math.nan
    ppl_tokens: int = 0
    greedy_answer: str = ""
    error: str = ""


# ---------------------------------------------------------------- theory

def weight_inventory(model: Any, mode: str | LoadMode, compute_dtype: Any,
                     gguf_types: Mapping[str, str] | None = None) -> WeightInventory:
    """The formats ``mode`` stores ``model``'s weights in, counted from the model's actual modules.

    ``model`` may be the float model, a bitsandbytes one or one packed for the CPU kernels: the shapes
    are read the same way from each, so packed storage does not skew counts. In gguf mode the file's
    tensor types decide (``gguf_types``: parameter name -> GGUF type, from ``gguf_weight_types``).
    """
    mode = LoadMode.parse(mode)
    if mode is LoadMode.AUTO:
        raise ValueError("load mode 'auto' has no layout of its own: pass the mode it resolved to (LoadedModel.mode)")
    if mode is LoadMode.GGUF and gguf_types is None:
        raise ValueError("the gguf layout is the file's own: pass gguf_types (gguf_weight_types(path))")
    compute = str(compute_dtype).replace("torch.", "")
    if compute not in FORMAT_BITS:
        raise ValueError(f"no bit count for compute dtype {compute_dtype}")
    counts: dict[str, int] = {}
    for name, role, elements, width in _stored_weights(model):
        fmt = _format(mode, role, name, width, compute, gguf_types or {})
        counts[fmt] = counts.get(fmt, 0) + elements
    return WeightInventory(counts)


def _stored_weights(model: Any) -> Iterator[tuple[str, str, int, int]]:
    """(name, role, elements, input width) of every stored tensor, once; role is embedding, head, linear or other.

    A head tied to the embedding shares its storage (its ``weight``, or its packed ``qs``) and is
    yielded once, as the embedding.
    """
    from torch import nn

    from llama_lab.model.quant import QuantEmbedding, QuantLinear

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, QuantLinear)):
            storage, rows, width = (module.qs if isinstance(module, QuantLinear) else module.weight,
                                    module.out_features, module.in_features)
            role = "head" if module is head else "linear"
        elif isinstance(module, (nn.Embedding, QuantEmbedding)):
            storage = module.qs if isinstance(module, QuantEmbedding) else module.weight
            rows, width, role = module.num_embeddings, module.embedding_dim, "embedding" if module is embed else "other"
        else:
            continue
        if id(storage) in seen:
            continue
        seen.add(id(storage))
        yield f"{name}.weight", role, rows * width, width
        bias = getattr(module, "bias", None)
        if isinstance(module, QuantLinear) and bias is not None:  # a buffer there, so not among the parameters
            yield f"{name}.bias", "other", bias.numel(), 0
    for name, param in model.named_parameters():  # norms, biases of float linears
        if id(param) not in seen:
            yield name, "other", param.numel(), 0


def _format(mode: LoadMode, role: str, name: str, width: int, compute: str, gguf_types: Mapping[str, str]) -> str:
    """The storage format of one tensor in ``mode``."""
    if mode in (LoadMode.FULL, LoadMode.CPU):
        return compute
    if mode.bits:
        return ("bnb-int8" if mode.bits == 8 else "bnb-nf4") if role == "linear" else compute
    if role == "other" or width % KERNEL_GROUP:
        return "float32"
    if mode is LoadMode.GGUF:
        try:
            return gguf_kernel_format(gguf_types[name])
        except KeyError:
            raise ValueError(f"the GGUF file has no tensor for {name}") from None
    kernel_format = mode.cpu_kernel_format
    assert kernel_format is not None, mode
    return "q8" if role in ("embedding", "head") else kernel_format


def gguf_kernel_format(qtype: str) -> str:
    """The format a GGUF tensor type is kept in for the CPU kernels (``model/quant.py``'s ``from_gguf_blocks``)."""
    if qtype in ("F32", "F16", "BF16"):
        return "float32"
    if qtype in ("Q4_0", "Q4_1", "Q4_K"):
        return "q4"
    return "q5" if qtype in ("Q5_0", "Q5_1", "Q5_K") else "q8"


def gguf_weight_types(gguf: Path) -> dict[str, str]:
    """Parameter name -> the GGUF file's type for it, as the one-time repack recorded them from the file.

    The repack (``ensure_packed``, a no-op once done) writes them beside the packed copy, so the
    file is not parsed again (3-4 s on two cores) for every row.
    """
    import json

    from llama_lab.cache import MARKER
    from llama_lab.model.gguf_native import ensure_packed

    return dict(json.loads((ensure_packed(gguf) / MARKER).read_text())["types"])


def preset_inventory(preset: str, mode: str | LoadMode, compute_dtype: Any = None) -> WeightInventory:
    """Theoretical bytes for an architecture preset (e.g. ``llama-3-8b``) without allocating it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = dict(ARCH_PRESETS[preset])
    if fields.get("vocab_size") is None:
        from transformers import AutoTokenizer

        from llama_lab.model.loading import converted_gguf_dir, embedded_gguf_path

        fields["vocab_size"] = len(AutoTokenizer.from_pretrained(converted_gguf_dir(embedded_gguf_path())))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**fields))
    return weight_inventory(model, mode, compute_dtype or torch.bfloat16)


# ---------------------------------------------------------------- machine description

def machine_info() -> dict[str, str]:
    """What the CSV records next to every row, so tables from different boxes can be compared."""

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # a broken CUDA install still gets a CPU table
        pass
    return {
        "cpu": cpu_kind(),
        "cpu_cores": str(os.cpu_count()),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "bitsandbytes": version("bitsandbytes"),
        "llama_lab": version("llama-lab"),
        # other work on the box skews every timing: record how busy it was when the table was made
        "loadavg_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ---------------------------------------------------------------- measurements

def perplexity(lm: "LoadedModel", text: str, max_tokens: int = 512) -> tuple[float, int]:
    """exp(mean next-token loss) over the first ``max_tokens`` tokens of ``text``."""
    import torch

    ids = lm.tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the perplexity text needs at least two tokens")
    with torch.inference_mode():
        inputs = torch.tensor([ids], device=lm.device)
        out = lm.model(input_ids=inputs, labels=inputs)
    return float(torch.exp(out.loss.float())), len(ids)


@dataclasses.dataclass
class StreamTiming:
    """Timestamps of one streamed request: when it was submitted, each (time, tokens so far)."""

    submitted: float
    points: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: str | None = None

    @property
    def first(self) -> float:
        return self.points[0][0]

    @property
    def last(self) -> float:
        return self.points[-1][0]

    @property
    def tokens(self) -> int:
        return self.points[-1][1] if self.points else 0


def timed_requests(engine: "Engine", prompts: Sequence[Sequence[int]], max_tokens: int,
                   timeout_s: float = 600.0) -> list[StreamTiming]:
    """Submit all prompts at once (greedy, ``ignore_eos``) and time every delta of every request."""
    from llama_lab.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    timings = []
    for ids in prompts:
        timing = StreamTiming(submitted=time.perf_counter())

        def sink(delta: Any, timing: StreamTiming = timing) -> None:
            now = time.perf_counter()
            if delta.completion_tokens:
                timing.points.append((now, delta.completion_tokens))
            if delta.finish_reason is not None:
                timing.error = delta.error if delta.finish_reason == "error" else None
                timing.done.set()

        engine.submit(ids, params, sink)
        timings.append(timing)
    deadline = time.monotonic() + timeout_s
    for timing in timings:
        if not timing.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"generation did not finish within {timeout_s:.0f} s")
        if timing.error:
            raise RuntimeError(f"generation failed: {timing.error}")
        if not timing.points:
            raise RuntimeError("a request finished without producing a token")
    return timings


def decode_rate(timings: Sequence[StreamTiming]) -> float:
    """Aggregate tokens/s once every request is decoding: tokens produced after the last first token."""
    start = max(t.first for t in timings)
    end = max(t.last for t in timings)
    produced = 0
    for t in timings:
        before = max((n for when, n in t.points if when <= start), default=0)
        produced += t.tokens - before
    return produced / (end - start) if end > start else math.nan


def _device_memory(lm: "LoadedModel", mon: Monitor) -> float:
    """What nvidia-smi shows on a GPU (NVML), else what the load added to the process RSS."""
    if lm.device.type == "cuda":
        sample = mon.sample_now()
        if not math.isnan(sample.gpu_mem_used_bytes):
            return sample.gpu_mem_used_bytes
        import torch

        return float(torch.cuda.memory_reserved(lm.device))
    return math.nan


def _import_heavy(mode: LoadMode) -> None:
    """Import what ``load_model`` imports before the load is timed, so load time and RSS growth are the model's.

    That is the library's cost, paid once per process: transformers' model machinery (load_model's own
    baseline comes after it too), bitsandbytes, and for the CPU kernels' modes the loaders and the
    kernels' shared library.
    """
    import torch  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    if mode.bits:
        try:
            import bitsandbytes  # noqa: F401
        except Exception:  # load_model reports the problem with a better message
            pass
    if mode is LoadMode.GGUF or mode.cpu_kernel_format:
        import safetensors.torch  # noqa: F401

        from llama_lab import kernels
        from llama_lab.model import gguf_native, quant_stream  # noqa: F401

        kernels.load()  # an error here is load_model's to report


def measure_mode(settings: BenchSettings, mode: str) -> ModeResult:
    """Measure one load mode in this process; failures become a row with ``error`` set."""
    import psutil

    result = ModeResult(mode=mode, batch=settings.batch, decode_tokens=settings.decode_tokens)
    try:
        _measure(settings, LoadMode.parse(mode), result)
    except Exception as exc:  # e.g. bitsandbytes missing: the other modes still get measured
        logger.exception("mode %s failed", mode)
        result.error = f"{type(exc).__name__}: {exc}"
    if math.isnan(result.process_rss_bytes):
        result.process_rss_bytes = float(psutil.Process().memory_info().rss)
    return result


def _measure(settings: BenchSettings, mode: LoadMode, r: ModeResult) -> None:
    import gc

    import psutil
    import torch

    from llama_lab.engine import Engine, SamplingParams
    from llama_lab.profiling import release_freed_memory
    from llama_lab.model.loading import load_model

    _import_heavy(mode)
    gc.collect()
    # hand free heap back first: an engine trims it once idle, which would otherwise show as negative growth
    release_freed_memory()
    proc = psutil.Process()
    with Monitor(interval_s=settings.interval_s) as mon:
        r.monitor_backend, r.energy_source = mon.backend, mon.energy_source
        rss0 = proc.memory_info().rss
        with mon.phase("load"):
            lm = load_model(settings.source, mode, device=settings.device, dtype=settings.dtype)
        rss1 = proc.memory_info().rss
        r.model, r.source, r.random_weights = lm.name, lm.source, lm.random_weights
        r.device, r.dtype = str(lm.device), str(lm.dtype).replace("torch.", "")
        r.load_s = lm.load_seconds
        r.weights_bytes = lm.weights_bytes
        gguf = gguf_file(settings.source) if lm.mode is LoadMode.GGUF else None
        # lm.mode, not mode: "cpu" on a GGUF file loads the gguf layout
        inv = weight_inventory(lm.model, lm.mode, lm.dtype, gguf_weight_types(gguf) if gguf else None)
        r.params, r.theoretical_bytes, r.weights_layout = inv.params, inv.theoretical_bytes, inv.describe()
        r.weights_vs_theory = lm.weights_bytes / inv.theoretical_bytes
        r.weights_within_tolerance = abs(r.weights_vs_theory - 1.0) <= WEIGHTS_TOLERANCE
        r.process_rss_bytes = float(rss1)
        r.device_mem_bytes = float(rss1 - rss0) if lm.device.type == "cpu" else _device_memory(lm, mon)

        prompts = [lm.chat_prompt_ids([{"role": "user", "content": p}]) for p in DECODE_PROMPTS]
        prompts = [prompts[i % len(prompts)] for i in range(max(settings.batch, 1))]
        engine = Engine(_engine_model(lm, mode), max_batch_size=max(settings.batch, 1),
                        compile=settings.compile_for(mode))
        r.engine_decode = engine.describe()["decode"]
        try:
            with mon.phase("quality"):
                text = Path(settings.ppl_path).read_text(encoding="utf-8")
                # on the engine's thread: a second thread running torch keeps its own OpenMP team,
                # which then competes with the engine's for the cores and slows later decoding (docs/profiling.md)
                r.perplexity, r.ppl_tokens = engine.call(lambda: perplexity(lm, text, settings.ppl_max_tokens)).result()
            with mon.phase("warmup"):  # the same shapes as the timed runs: lazy init and kernel choices are paid here
                timed_requests(engine, prompts[:1], settings.decode_tokens)
                timed_requests(engine, prompts[: settings.batch], settings.decode_tokens)

            if lm.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(lm.device)
            exact_peak = reset_peak_rss()
            gen_start = mon.sample_now().t

            r.repeats = max(1, settings.repeats)
            rates, ttfts, energies = [], [], []
            for _ in range(r.repeats):
                with mon.phase("batch 1") as ph1:
                    b1 = timed_requests(engine, prompts[:1], settings.decode_tokens)[0]
                ttfts.append(b1.first - b1.submitted)
                rates.append(decode_rate([b1]))
                # energy over the whole request (prefill included): phase edges sit exactly on samples
                e1 = mon.summary(ph1.start, ph1.end).energy_j
                if not math.isnan(e1) and b1.tokens:
                    energies.append(e1 / b1.tokens)
                mon.add_phase("prefill", mon.clock(b1.submitted), mon.clock(b1.first))
                mon.add_phase("decode", mon.clock(b1.first), mon.clock(b1.last))
            r.ttft_s = statistics.median(ttfts)
            r.decode_tok_s_b1, r.decode_tok_s_b1_min, r.decode_tok_s_b1_max = statistics.median(rates), min(rates), max(rates)
            if energies:
                r.energy_j_per_token = statistics.median(energies)

            rates = []
            for _ in range(r.repeats):
                with mon.phase(f"batch {settings.batch}"):
                    many = timed_requests(engine, prompts[: settings.batch], settings.decode_tokens)
                rates.append(decode_rate(many))
                mon.add_phase("prefill", mon.clock(min(t.submitted for t in many)), mon.clock(max(t.first for t in many)))
                mon.add_phase("decode", mon.clock(max(t.first for t in many)), mon.clock(max(t.last for t in many)))
            r.decode_tok_s_batch = statistics.median(rates)
            r.decode_tok_s_batch_min, r.decode_tok_s_batch_max = min(rates), max(rates)
            r.batch_method = f"engine ({r.engine_decode}), {settings.batch} concurrent requests"

            gen_stats = mon.summary(gen_start, None)
            if lm.device.type == "cuda":
                nvml_peak = gen_stats.peak_gpu_mem_bytes
                r.peak_mem_bytes = nvml_peak if not math.isnan(nvml_peak) else float(
                    torch.cuda.max_memory_reserved(lm.device))
            else:
                # relative to the RSS before the load, like device_mem_bytes, so the two compare
                hwm = peak_rss_bytes() if exact_peak else None
                r.peak_mem_bytes = float(max(hwm or 0, gen_stats.peak_rss_bytes) - rss0)

            with mon.phase("answer"):
                answer = engine.generate(lm.chat_prompt_ids([{"role": "user", "content": ANSWER_PROMPT}]),
                                         SamplingParams(max_tokens=settings.answer_tokens, temperature=0.0))
            r.greedy_answer = answer.text.strip()
        finally:
            engine.close()
    logger.info("mode %s: %s", mode.value, r)


def _quiet_child() -> None:
    logging.basicConfig(level=logging.WARNING)
    # bitsandbytes warns on every 8-bit matmul on CPU ("inputs will be cast ..."): once is plenty
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per mode in the parent is enough


def _measure_in_child(settings: BenchSettings, mode: str) -> ModeResult:
    _quiet_child()
    return measure_mode(settings, mode)


def _prepare_in_child(settings: BenchSettings, mode: str) -> None:
    from llama_lab.model.loading import load_model

    load_model(settings.source, mode, device=settings.device, dtype=settings.dtype)


def _engine_model(lm: "LoadedModel", mode: str | LoadMode) -> "LoadedModel":
    """``lm`` under a name of its own per mode, which the engine names its compiled-step package after.

    The cache keeps one package per name, so under the model's own name every mode's build would
    evict the previous mode's (and the server's): each run of the table would compile them all again.
    """
    return dataclasses.replace(lm, name=f"{lm.name}-{LoadMode.parse(mode).value}")


def _compile_in_child(settings: BenchSettings, mode: str) -> None:
    from llama_lab.engine import Engine
    from llama_lab.model.loading import load_model

    _quiet_child()
    lm = load_model(settings.source, mode, device=settings.device, dtype=settings.dtype)
    Engine(_engine_model(lm, mode), max_batch_size=max(settings.batch, 1), compile=settings.compile_for(mode)).close()


def _builds_a_package(settings: BenchSettings, mode: LoadMode) -> bool:
    """Whether the engine compiles ``mode``'s decode step ahead of time into the cache: on the CPU, with
    compile on, and not bitsandbytes (whose layers run eagerly)."""
    import torch

    from llama_lab.engine.engine import default_compile

    wanted = settings.compile_for(mode.value)
    if mode.bits or wanted is False or (wanted is None and not default_compile()):
        return False
    on_cpu = mode in (LoadMode.CPU, LoadMode.GGUF) or mode.cpu_kernel_format is not None
    return on_cpu or not (settings.device or torch.cuda.is_available())


def prepare_compiled_steps(settings: BenchSettings) -> None:
    """Build each mode's compiled decode step (once per model, mode and machine) in a process of its own.

    The measuring process then loads it from the cache, so its memory figures never hold what a build
    leaves resident (about 0.5 GiB for SmolLM2 in full precision), and a cold cache measures like a warm one.
    """
    for mode in dict.fromkeys(LoadMode.parse(m) for m in settings.modes):
        if not _builds_a_package(settings, mode):
            continue
        started = time.perf_counter()
        try:
            _in_fresh_process(_compile_in_child, settings, mode.value)
        except Exception as exc:  # the measuring process meets (and reports) the same problem
            logger.warning("preparing the compiled decode step of %s failed: %s", mode.value, exc)
        else:
            logger.info("compiled decode step of %s ready in %.1f s", mode.value, time.perf_counter() - started)


def prepare_source(settings: BenchSettings) -> None:
    """Do the one-time work before anything is timed: GGUF to safetensors, the GGUF repack for the CPU
    kernels, building the kernels, random-preset checkpoints."""
    from llama_lab.model.loading import converted_gguf_dir

    src = settings.source
    modes = {LoadMode.parse(m) for m in settings.modes}
    gguf = gguf_file(src)
    if (LoadMode.GGUF in modes or any(m.cpu_kernel_format for m in modes)) and not settings.device:
        from llama_lab.model.quant import require_kernels

        require_kernels()  # a C++ build on a machine's first use (~20-40 s)
    if gguf is not None:
        if modes - {LoadMode.GGUF, LoadMode.CPU}:  # the modes that read the safetensors copy (auto on a GPU)
            converted_gguf_dir(gguf)
        if modes & {LoadMode.GGUF, LoadMode.CPU, LoadMode.AUTO}:  # the modes that (may) keep the file's blocks
            from llama_lab.model.gguf_native import ensure_packed

            ensure_packed(gguf)
    elif src.startswith("random:"):
        quant = [m for m in settings.modes if LoadMode.parse(m).bits]
        if quant:  # quantized random loads go through a cached checkpoint, written on first use
            if settings.isolate:  # keep this process free of torch state the children should not share
                _in_fresh_process(_prepare_in_child, settings, quant[0])
            else:
                _prepare_in_child(settings, quant[0])


def _in_fresh_process(fn: Any, *args: Any) -> Any:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def run_table(settings: BenchSettings = BenchSettings(), progress: bool = True) -> list[ModeResult]:
    """Measure every mode, each in a fresh spawned process unless ``settings.isolate`` is False."""
    from tqdm.auto import tqdm

    modes = [LoadMode.parse(m).value for m in settings.modes]
    try:
        prepare_source(settings)
    except Exception as exc:  # the per-mode rows will carry the error
        logger.warning("preparing %s failed: %s", settings.source, exc)
    if settings.isolate:  # in one process, the measuring engine compiles as it starts, as before
        prepare_compiled_steps(settings)
    results = []
    bar = tqdm(modes, desc="quantization table", unit="mode", disable=not progress)
    for mode in bar:
        bar.set_postfix_str(f"measuring {mode}")
        if settings.isolate:
            try:
                res = _in_fresh_process(_measure_in_child, settings, mode)
            except Exception as exc:  # the child died (e.g. out of memory)
                res = ModeResult(mode=mode, error=f"worker process failed: {type(exc).__name__}: {exc}")
        else:
            res = measure_mode(settings, mode)
        results.append(res)
        if not res.error:
            bar.set_postfix_str(f"{mode}: {res.decode_tok_s_b1:.1f} tok/s")
    bar.close()
    return results


# ---------------------------------------------------------------- output

MIB = 2**20
CSV_COLUMNS = [f.name for f in dataclasses.fields(ModeResult)]


def to_frame(results: Iterable[ModeResult], machine: dict[str, str] | None = None) -> "pd.DataFrame":
    """The table as a DataFrame, machine description repeated on every row."""
    import pandas as pd

    machine = machine if machine is not None else machine_info()
    rows = [{**dataclasses.asdict(r), **machine} for r in results]
    return pd.DataFrame(rows, columns=CSV_COLUMNS + list(machine))


def save_csv(results: Sequence[ModeResult], path: str | os.PathLike, machine: dict[str, str] | None = None) -> Path:
    """Write the table (with the machine description) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_frame(results, machine).to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, float_format="%.6g")
    return path


def load_csv(path: str | os.PathLike) -> "pd.DataFrame":
    import pandas as pd

    return pd.read_csv(path, keep_default_na=True).fillna({"error": "", "greedy_answer": ""})


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def theory_table(preset: str = "llama-3-8b") -> str:
    """Theoretical weight bytes per mode for an architecture preset; for the 8B, beside the write-up's nvidia-smi."""
    seed = preset == "llama-3-8b"
    lines = [f"{'mode':>5}  {'theory weights MiB':>18}" + (f"  {'seed nvidia-smi MiB':>19}" if seed else "")
             + f"   ({preset}, bf16 compute; nvidia-smi adds the CUDA context, ~0.4-0.5 GiB; "
               "int8/int4 are the CPU kernels' layouts, in RAM)"]
    for mode in ("full", "8bit", "4bit", "int8", "int4"):
        inv = preset_inventory(preset, mode)
        lines.append(f"{mode:>5}  {inv.theoretical_bytes / MIB:>18.0f}"
                     + (f"  {SEED_8B_MIB.get(mode, '-'):>19}" if seed else ""))
    return "\n".join(lines)


def format_table(results: Sequence[ModeResult], seed_mib: dict[str, int] | None = None) -> str:
    """A readable fixed-width table; ``seed_mib`` adds the reference write-up's nvidia-smi figures beside ours."""
    header = ["mode", "load s", "weights MiB", "theory MiB", "w/theory", "device MiB", "RSS MiB", "peak MiB",
              "TTFT s", "tok/s b1", "b1 spread", "tok/s bN", "bN spread", "decode", "J/tok", "ppl"]
    if seed_mib:
        header.append("seed 8B MiB")
    rows = []
    for r in results:
        if r.error:
            rows.append([r.mode, "error: " + r.error[:80]])
            continue
        ok = "ok" if r.weights_within_tolerance else "OFF"
        row = [
            r.mode, _fmt(r.load_s, ".1f"), _fmt(r.weights_bytes / MIB, ".0f"), _fmt(r.theoretical_bytes / MIB, ".0f"),
            f"{r.weights_vs_theory:.2f} {ok}", _fmt(r.device_mem_bytes / MIB, ".0f"),
            _fmt(r.process_rss_bytes / MIB, ".0f"), _fmt(r.peak_mem_bytes / MIB, ".0f"), _fmt(r.ttft_s, ".3f"),
            _fmt(r.decode_tok_s_b1, ".1f"), f"{_fmt(r.decode_tok_s_b1_min, '.1f')}-{_fmt(r.decode_tok_s_b1_max, '.1f')}",
            _fmt(r.decode_tok_s_batch, ".1f"),
            f"{_fmt(r.decode_tok_s_batch_min, '.1f')}-{_fmt(r.decode_tok_s_batch_max, '.1f')}",
            _decode_short(r.engine_decode), _fmt(r.energy_j_per_token, ".3f"),
            _fmt(r.perplexity, ".2f"),
        ]
        if seed_mib:
            row.append(str(seed_mib.get(r.mode, "")))
        rows.append(row)
    widths = [max([len(h)] + [len(row[i]) for row in rows if len(row) == len(header)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        if len(row) == len(header):
            lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        else:
            lines.append(f"{row[0].rjust(widths[0])}  {row[1]}")
    first = next((r for r in results if not r.error), None)
    if first is not None:
        lines.append(f"model {first.model} ({first.params / 1e6:.1f}M params, {'RANDOM' if first.random_weights else 'trained'} "
                     f"weights) on {first.device}; batch N={first.batch} via the engine, {first.batch} concurrent requests; "
                     f"{first.decode_tokens} decode tokens; speeds: median of {first.repeats} runs after a warm-up "
                     f"of the same shapes (spread: min-max); energy: {first.energy_source}")
        lines.append(f"w/theory: framework weights / (params x bits/8 in the mode's layout: bitsandbytes keeps embeddings "
                     f"and head in the compute dtype; the CPU kernels' q4 = 5, q5 = 6 and q8 = 8.5 bits/weight with their float16 "
                     f"scales, embedding and head q8, norms float32); ok = within {WEIGHTS_TOLERANCE:.0%}; "
                     f"decode: the engine's step (compiled<=N: compiled up to N rows, eager beyond)")
    return "\n".join(lines)


def _decode_short(engine_decode: str) -> str:
    """"compiled ahead of time (up to 4 rows; eager beyond)" -> "compiled<=4"; "eager" stays."""
    if not engine_decode.startswith("compiled"):
        return engine_decode.split(" (")[0] or "n/a"
    rows = re.search(r"up to (\d+) rows", engine_decode)
    return f"compiled<={rows.group(1)}" if rows else "compiled"


def summary_json(results: Sequence[ModeResult]) -> dict[str, Any]:
    """The figures scripts care about, keyed by mode (the last stdout line of the bench script)."""
    out: dict[str, Any] = {}
    for r in results:
        if r.error:
            out[r.mode] = {"error": r.error}
            continue
        out[r.mode] = {
            "load_s": round(r.load_s, 3), "weights_mib": round(r.weights_bytes / MIB, 1),
            "theory_mib": round(r.theoretical_bytes / MIB, 1), "weights_within_15pct": r.weights_within_tolerance,
            "weights_layout": r.weights_layout,
            "device_mib": round_or_none(r.device_mem_bytes / MIB, 1), "peak_mib": round_or_none(r.peak_mem_bytes / MIB, 1),
            "ttft_s": round_or_none(r.ttft_s, 4), "tok_s_b1": round_or_none(r.decode_tok_s_b1, 2),
            "tok_s_b1_spread": [round_or_none(r.decode_tok_s_b1_min, 2), round_or_none(r.decode_tok_s_b1_max, 2)],
            "engine_decode": r.engine_decode,
            f"tok_s_b{r.batch}": round_or_none(r.decode_tok_s_batch, 2), "j_per_token": round_or_none(r.energy_j_per_token, 4),
            "perplexity": round_or_none(r.perplexity, 3), "answer": r.greedy_answer,
        }
    return out
