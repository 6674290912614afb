"""Building the CPU's compiled decode step in another process while the server decodes eagerly.

A model's first start on a machine would otherwise wait a minute or more for the ahead-of-time
compile before answering anything. The build runs as ``python -m llama_lab.engine.background_build``:
a niced child process that loads the same model from the cache (the GGUF repack and the kernels are
already there, so that takes seconds), makes the same runner and writes the package where the
server will look for it. A process and not a thread, because ``torch.export`` swaps a module's
parameters for fake tensors while it traces, which the engine thread's eager steps would then read,
and because a niced process yields its core the moment a decode step wants it (the thread policy
does not count lower-priority work as a neighbour). When the child is done, the runner loads the
package on the engine thread between two steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

NICENESS = 10


class BackgroundBuild:
    """The child process building ``path``; ``on_done(ok, error)`` is called from a watcher thread."""

    def __init__(self, loaded: Any, *, path: Path, max_batch_size: int,
                 on_done: Callable[[bool, str | None], None]) -> None:
        self.path = path
        self.started = time.perf_counter()
        self.seconds: float | None = None
        argv = [sys.executable, "-m", "llama_lab.engine.background_build", "--model", str(loaded.source),
                "--mode", loaded.mode.value, "--dtype", str(loaded.dtype).replace("torch.", ""), "--name", loaded.name,
                "--seed", str(loaded.seed), "--max-batch-size", str(max_batch_size), "--expect", str(path)]
        env = {**os.environ, "LLAMA_LAB_COMPILE": "1"}
        self._proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        try:  # before it imports torch: the threads and compilers it starts inherit the priority
            os.setpriority(os.PRIO_PROCESS, self._proc.pid, NICENESS)
        except OSError:  # it already exited, or a platform without priorities: the build just competes
            pass
        self._on_done = on_done
        self._watcher = threading.Thread(target=self._wait, name="llama-lab-compile-watch", daemon=True)
        self._watcher.start()
        logger.info("compiling the decode step in the background (pid %d; once per model and machine); decoding "
                    "eagerly until it is ready", self._proc.pid)

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def _wait(self) -> None:
        _, err = self._proc.communicate()
        self.seconds = time.perf_counter() - self.started
        ok = self._proc.returncode == 0 and self.path.is_file()
        error = None
        if not ok:
            tail = (err or "").strip().splitlines()[-3:]
            error = (f"the background build exited with {self._proc.returncode}: " + " | ".join(tail)
                     if self._proc.returncode else f"the background build did not write {self.path}")
        self._on_done(ok, error)

    def stop(self) -> None:
        if self.running:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build a model's compiled decode step into the cache (run by the server)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--dtype")
    ap.add_argument("--name")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch-size", type=int, required=True)
    ap.add_argument("--expect", required=True, help="the package path the server waits for")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from llama_lab.engine.engine import make_runner
    from llama_lab.model import load_model

    loaded = load_model(args.model, args.mode, dtype=args.dtype, name=args.name, seed=args.seed)
    # the smallest cache: the package's shapes do not depend on its size, only on its block shape
    runner = make_runner(loaded, max_batch_size=args.max_batch_size, compile=True, kv_cache_tokens=1,
                         prefix_caching=False)
    runner.warm_up()
    if not Path(args.expect).is_file():
        built = (runner.describe().get("compiled_package") or {}).get("path")
        print(f"built {built}, not the expected {args.expect}: the server's model or settings differ from ours",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
