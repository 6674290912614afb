"""The CPU decode step compiled ahead of time (torch.export + AOTInductor) and kept on disk.

``torch.compile`` could not carry its work over to the next process: with weight freezing the graph
holds oneDNN-packed weights, which inductor's FX graph cache cannot pickle ("mkldnn tensors
unpickleable"), so every start compiled again (66-80 s for SmolLM2 on 2 cores). AOTInductor compiles
the same frozen step (same options, same C++ GEMM kernels: the same greedy tokens and step time,
measured) into a ``.pt2`` package with the packed weights inside, and a later start loads that in
about two seconds.

Because the weights are inside, the package's name is keyed by their bytes (sha256) and by everything
else that shapes the generated code: the model's constants, the engine's source, torch, Python, the
CPU's flags, the inductor options and the largest batch. A new key replaces the model's older
packages, so one model keeps one package (about twice its weights on disk).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from llama_lab.kernels import cpu_flags

logger = logging.getLogger(__name__)

# Bump when the package's contents change in a way the key below does not see.
PACKAGE_FORMAT = 2
# Frozen, pre-packed weights and only the C++ GEMM templates (no timing contest against oneDNN): they
# won every decode shape measured on a quiet machine, and a contest timed on a busy one picked oneDNN
# for some layers and kept that choice for good (the step went from 13.7 to 18-26 ms). The weights go
# into a blob beside the library rather than into its data section: loaded that way they are in memory
# once, not twice (measured with SmolLM2: 1.55 GB RSS for the whole engine against 2.07 GB).
# Dynamic threads: every parallel region asks OpenMP for the engine's current thread count instead of
# a count baked in at compile time, so the engine can drop to fewer threads when the machine is busy
# (engine/threads.py). The work is still split for the machine's core count (``cpp.threads``): a
# package built under taskset or a quota stays fast when a later start may use every core.
INDUCTOR_OPTIONS: dict[str, Any] = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP",
                                    "cpp.dynamic_threads": True, "cpp.threads": os.cpu_count() or 1,
                                    "aot_inductor.package_constants_in_so": False,
                                    "aot_inductor.package_constants_on_disk_format": "binary_blob"}
# The files whose text shapes the compiled code.
SOURCES = (("llama_lab.engine", "llama.py"), ("llama_lab.engine", "attention.py"), ("llama_lab.engine", "compiled_step.py"),
           ("llama_lab.model", "quant.py"), ("llama_lab.kernels", "csrc/paged_attention.cpp"),
           ("llama_lab.kernels", "csrc/quant_linear.cpp"))


class NoRoomOnDisk(RuntimeError):
    """The package would not fit in the cache directory or the temporary directory."""


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, shape, dtype, bytes); tied tensors count once."""
    h = hashlib.sha256()
    seen: set[tuple[int, int, torch.dtype]] = set()
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        same = (t.data_ptr(), t.numel(), t.dtype)
        if same in seen:
            continue
        seen.add(same)
        data = t.detach().contiguous().cpu().reshape(-1)
        h.update(memoryview(data.view(torch.uint8).numpy()))
    return h.hexdigest()


def package_key(model: nn.Module, *, shape_constants: tuple[Any, ...], max_rows: int) -> str:
    """The name a package for this model and this machine gets: see the module doc."""
    h = hashlib.sha256()
    for part in (PACKAGE_FORMAT, weights_digest(model), shape_constants, max_rows, sorted(INDUCTOR_OPTIONS.items()),
                 torch.__version__, sys.version_info[:2], cpu_flags()):
        h.update(repr(part).encode() + b"\0")
    for package, source in SOURCES:
        h.update((files(package) / source).read_bytes())
    return h.hexdigest()[:20]


def _export(model: nn.Module, example: tuple[Any, ...], max_rows: int) -> Any:
    """The decode step as an ExportedProgram: any 1..max_rows tokens, block-table width and cache size.

    ``example`` is ``FastLlama.forward``'s arguments: seven step tensors, then the per-layer K and V
    cache lists, with at least two rows (an example size of 1 would be a constant to the tracer); the
    declared range still starts at one row, so a single sequence runs without a padding row (which
    would cost the matrix products a second row of arithmetic).
    """
    from torch.export import Dim, export

    rows, width, blocks = Dim("rows", min=1, max=max_rows), Dim("width", min=2), Dim("blocks", min=2)
    *step, k_caches, v_caches = example
    per_token = {0: rows}
    dynamic = [per_token] * len(step)
    dynamic[5] = {0: rows, 1: width}  # block_tables [rows, width]
    cache = [{1: blocks}] * len(k_caches)
    with torch.inference_mode():
        return export(model, example, dynamic_shapes=(*dynamic, cache, cache), strict=False)


def _discard_build_copy(package: Path) -> None:
    """Delete the library and weights AOTInductor left in its cache dir: the package holds the same bytes."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    with zipfile.ZipFile(package) as z:
        names = [Path(n).name for n in z.namelist() if n.endswith((".so", ".blob"))]
    for name in names:
        for path in Path(cache_dir()).glob(f"*/{name}"):
            path.unlink(missing_ok=True)


def _check_disk(directory: Path, weights_bytes: int) -> None:
    """The package is about twice the weights; it is written here and unpacked to the temp dir at load."""
    need = 3 * weights_bytes
    for where in (directory, Path(tempfile.gettempdir())):
        free = shutil.disk_usage(where).free
        if free < need:
            raise NoRoomOnDisk(f"{where} has {free / 2**30:.1f} GiB free; the compiled step needs about "
                               f"{need / 2**30:.1f} GiB there")


@contextlib.contextmanager
def _unpacked_privately() -> Iterator[str]:
    """Let AOTInductor unpack a package into a directory of ours, deleted once the package is loaded.

    Its loader unpacks into a fresh directory under ``TMPDIR`` and removes it only when the loader is
    destroyed, which a killed server never does: a day of starts here left fourteen 521 MB copies in
    /tmp. Once loaded, the library is mapped and the weights are in memory, and Linux keeps a deleted
    file's data while it is in use, so the directory can go at once. ``TMPDIR`` is the only way to
    point the loader elsewhere; it is changed for the process during the load (at engine start).
    """
    scratch = tempfile.mkdtemp(prefix="llama_lab-aoti-")  # first: Python's own temp dir is settled before TMPDIR moves
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = scratch
    try:
        yield scratch
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        shutil.rmtree(scratch, ignore_errors=True)


class CompiledStep:
    """A loaded package: call it like ``FastLlama.forward``; ``path`` and ``reused`` say where it came from.

    With ``module`` (the model the package was built from), the package reads the module's own tensors:
    its weights file is not loaded at all, so the weights are in memory once (for a GGUF, in the file's
    memory map). That needs every constant of the package to be one of the module's tensors under its
    own name; a package with derived constants (weights pre-packed for a GEMM at compile time) loads
    its weights file as before. ``shares_weights`` says which happened.
    """

    def __init__(self, path: Path, reused: bool, module: nn.Module | None = None) -> None:
        self.path, self.reused = path, reused
        self.shares_weights = False
        self._constants: dict[str, torch.Tensor] = {}  # the runner reads these without owning them
        with _unpacked_privately() as scratch:
            runner = _sharing_runner(path, module, Path(scratch)) if module is not None else None
            if runner is not None:
                self._runner, self._constants = runner
                self.shares_weights = True
                self._boxed: Callable[[list[torch.Tensor]], list[torch.Tensor]] = self._runner.run
            else:
                self._run: Any = torch._inductor.aoti_load_package(str(path))
                self._boxed = self._run.loader.boxed_run

    def __call__(self, *args: Any) -> torch.Tensor:
        # The package's own __call__ parses its input and output specs (JSON) and walks the arguments with
        # pytree at every step; the step's arguments are always seven tensors and two lists of caches,
        # whose flat order is exactly that, and its output is one tensor.
        *step, k_caches, v_caches = args
        return self._boxed([*step, *k_caches, *v_caches])[0]


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a module holds, by the dotted name ``torch.export`` lifts it under (tied ones under each name)."""
    found: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr, value in [*sub._parameters.items(), *sub._buffers.items(), *vars(sub).items()]:
            if isinstance(value, torch.Tensor):
                found.setdefault(f"{prefix}.{attr}" if prefix else attr, value)
    return found


def _sharing_runner(path: Path, module: nn.Module, scratch: Path) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """The package's library run over ``module``'s tensors (no copy), or None where that cannot be done."""
    runner_type = getattr(torch._C._aoti, "AOTIModelContainerRunnerCpu", None)
    if runner_type is None:
        return None
    with zipfile.ZipFile(path) as z:
        libraries = [n for n in z.namelist() if n.endswith(".so") and "/aotinductor/model/" in n]
        if len(libraries) != 1:
            return None
        # the library and what it reads beside it (the custom ops' call specs), not the weights
        folder = libraries[0].rpartition("/")[0] + "/"
        for name in z.namelist():
            if name.startswith(folder) and "/" not in name[len(folder):] and not name.endswith(".blob"):
                z.extract(name, scratch)
    runner = runner_type(str(scratch / libraries[0]), 1)
    names = runner.get_constant_names_to_original_fqns()
    dtypes = runner.get_constant_names_to_dtypes()
    tensors = _module_tensors(module)
    constants: dict[str, torch.Tensor] = {}
    for name, fqn in names.items():
        tensor = tensors.get(fqn)
        if tensor is None or not tensor.is_contiguous() or tensor.device.type != "cpu":
            logger.info("the compiled step keeps its own weights: its constant %s is not the module's tensor %r", name, fqn)
            return None
        constants[name] = tensor.detach()
    if set(dtypes) != set(constants) or any(_dtype_code(constants[n].dtype) != dtypes[n] for n in constants):
        logger.info("the compiled step keeps its own weights: its constants differ from the module's in name or dtype")
        return None
    runner.update_constant_buffer(constants, False, True, True)  # active buffer, every constant, user-managed
    return runner, constants


def _dtype_code(dtype: torch.dtype) -> int:
    """c10's ScalarType number for ``dtype``, as the runner reports its constants' dtypes (-1: not listed)."""
    return _SCALAR_TYPES.index(dtype) if dtype in _SCALAR_TYPES else -1


# c10::ScalarType order (the runner reports a constant's dtype by this number)
_SCALAR_TYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                 torch.float64, torch.complex32, torch.complex64, torch.complex128, torch.bool, torch.qint8,
                 torch.quint8, torch.qint32, torch.bfloat16]


def package_path(model: nn.Module, *, name: str, shape_constants: tuple[Any, ...], max_rows: int) -> Path:
    """Where this model's package is (or will be) kept: named by the model and keyed by everything it bakes in."""
    from llama_lab.model.loading import cache_root

    directory = cache_root() / "compiled"
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    path = directory / f"{stem}-{package_key(model, shape_constants=shape_constants, max_rows=max_rows)}.pt2"
    logger.debug("package key computed in %.1f s", time.perf_counter() - started)
    return path


def load_or_build(model: nn.Module, example: tuple[Any, ...], *, path: Path, max_rows: int,
                  weights_bytes: int) -> CompiledStep:
    """The package at ``path`` (``package_path``: the caller has it already, and its key hashes every
    weight) loaded from the cache, or built there (about a minute and a half for SmolLM2).

    A package that fails to load is built again; the build is written to a temporary name and
    renamed into place, so two servers starting at once never see half a file.
    """
    directory, stem = path.parent, path.stem.rsplit("-", 1)[0]  # <stem>-<key>.pt2
    if path.is_file():
        try:
            step = CompiledStep(path, reused=True, module=model)
            logger.info("loaded the compiled decode step from %s", path)
            return step
        except Exception as exc:  # a package from a broken write or an incompatible runtime: build anew
            logger.warning("could not load %s (%s); compiling again", path, str(exc).splitlines()[0] if str(exc) else exc)
            path.unlink(missing_ok=True)
    _check_disk(directory, weights_bytes)
    logger.info("compiling the decode step ahead of time (once per model and machine; about a minute and a half "
                "for a small model on 2 cores; later starts load %s)", path)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
    try:
        tmp = build / path.name
        with warnings.catch_warnings():  # torch's own pytree deprecation notice, not ours to act on
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            program = _export(model, example, max_rows)
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                     inductor_configs=dict(INDUCTOR_OPTIONS))
        _discard_build_copy(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    mine = re.compile(re.escape(stem) + r"-[0-9a-f]{20}\.pt2")
    for old in directory.iterdir():
        if old != path and mine.fullmatch(old.name):
            old.unlink(missing_ok=True)
    return CompiledStep(path, reused=False, module=model)
