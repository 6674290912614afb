"""The stop-button experiment (the seed's Bug 2): does the server stop when the client leaves?

A client streams a long chat completion, reads ``leave_after`` chunks and closes the connection,
as NextChat's stop button aborts its fetch. A ``Monitor`` watches the server process, and the
server's own counter (``/metrics``) says how many tokens it generated after the client left.
``compare()`` runs llama_lab's server and a reproduction of the old demo's pattern
(``bench/old_demo_server.py``) as subprocesses, the same way, so their timelines sit side by side:
the old pattern stays busy until ``max_tokens``; ours is idle within one decoding step.

    results = compare(StopSettings.quick())
    print(format_table(results)); plot(results)

``StopPanel`` is the interactive version for a notebook: Start / Stop buttons, tokens streaming
live, and the CPU of the process that runs the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import httpx

from llama_lab.profiling import Monitor, Sample
from llama_lab.runner import free_port, wait_healthy

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
OLD_DEMO = REPO / "bench" / "old_demo_server.py"
LONG_PROMPT = "Write a very long story about a lighthouse keeper."  # SmolLM2 greedy: runs past 300 tokens
OURS_COUNTER = "llama_lab_engine_steps"  # one decode step = one token while a single request runs
OLD_COUNTER = "old_demo_generated_tokens"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclasses.dataclass(frozen=True)
class StopSettings:
    """One run of the experiment; ``quick()`` is the CI / notebook variant."""

    model: str = "default"
    prompt: str = LONG_PROMPT
    max_tokens: int = 300
    leave_after: int = 20  # content chunks the client reads before leaving (the old demo sends words)
    idle_cpu_percent: float = 10.0  # below this (100 = one core), averaged over idle_hold_s, the server is idle
    idle_hold_s: float = 0.5
    window_s: float = 3.0  # CPU-seconds are reported for this long after the client left
    watch_s: float = 60.0  # give up waiting for idle after this (the old demo may run to max_tokens)
    interval_s: float = 0.1
    poll_s: float = 0.25  # how often /metrics is read after the client left
    # Torch threads in the server subprocesses. One keeps the CPU curve readable (100% = busy) and
    # avoids OpenMP oversubscription on small shared machines, where 2 threads can be 8x slower.
    threads: int | None = 1

    @classmethod
    def quick(cls, **overrides: Any) -> "StopSettings":
        """Short settings: about a minute for both servers on two CPU cores."""
        return cls(**{**dict(max_tokens=100, leave_after=8, watch_s=40.0), **overrides})


@dataclasses.dataclass
class StopResult:
    """What happened to one server after its client left. Times are monitor seconds."""

    server: str
    url: str
    pid: int
    settings: StopSettings
    chunks_before_leave: int
    leave_t: float
    tokens_at_leave: int  # the server's own counter when the client left
    tokens_final: int  # ... when we stopped watching
    idle_t: float | None  # None: still busy when watching stopped
    window_cpu_seconds: float
    ended_before_leave: bool  # the answer finished before the client could leave (prompt too short)
    token_curve: list[tuple[float, int]]  # (seconds since leave, tokens generated since leave)
    monitor: Monitor = dataclasses.field(repr=False)
    log: str = dataclasses.field(default="", repr=False)

    @property
    def tokens_after_leave(self) -> int:
        return self.tokens_final - self.tokens_at_leave

    @property
    def seconds_to_idle(self) -> float | None:
        return None if self.idle_t is None else max(0.0, self.idle_t - self.leave_t)

    @property
    def still_busy(self) -> bool:
        return self.idle_t is None

    def to_frame(self) -> "pd.DataFrame":
        """The monitor's timeline with ``server``, ``since_leave_s`` and a steadier ``cpu_percent_avg``.

        ``cpu_percent_avg`` is recomputed over gaps of at least one sampling interval: the extra
        samples taken at phase marks span a few milliseconds, and a percentage over such a sliver
        spikes.
        """
        df = self.monitor.to_frame()
        df.insert(0, "server", self.server)
        df.insert(2, "since_leave_s", df["t"] - self.leave_t)
        avg, last_t, last_c = [], None, 0.0
        for t, c in zip(df["t"], df["cpu_seconds"]):
            if last_t is None:
                avg.append(math.nan)
                last_t, last_c = t, c
            elif t - last_t >= 0.8 * self.settings.interval_s:
                avg.append(100.0 * (c - last_c) / (t - last_t))
                last_t, last_c = t, c
            else:
                avg.append(math.nan)
        df["cpu_percent_avg"] = avg
        return df

    def plot(self, title: str | None = None) -> "Figure":
        """The monitor's own plot, phases shaded: streaming, generating after the leave, idle."""
        return self.monitor.plot(title or f"{self.server}: {self.tokens_after_leave} tokens after the client left")

    def summary(self) -> dict[str, Any]:
        return {"server": self.server, "tokens_after_leave": self.tokens_after_leave,
                "seconds_to_idle": _round(self.seconds_to_idle, 2), "still_busy": self.still_busy,
                "cpu_seconds_after": _round(self.window_cpu_seconds, 2), "window_s": self.settings.window_s,
                "chunks_before_leave": self.chunks_before_leave, "tokens_at_leave": self.tokens_at_leave,
                "ended_before_leave": self.ended_before_leave}


# ---------------------------------------------------------------- measuring one server

def read_counter(url: str, name: str, client: httpx.Client | None = None, timeout: float = 30.0) -> int:
    """One counter from a server's Prometheus ``/metrics`` text."""
    get = client.get if client is not None else httpx.get
    text = get(f"{url}/metrics", timeout=timeout).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise KeyError(f"{url}/metrics has no {name!r}")


def _content(line: str) -> str:
    """The text of one SSE ``data:`` line of a chat stream ('' for role, finish and [DONE] chunks)."""
    if not line.startswith("data:") or line.strip() == "data: [DONE]":
        return ""
    try:
        choices = json.loads(line[5:]).get("choices") or [{}]
    except ValueError:
        return ""
    return (choices[0].get("delta") or {}).get("content") or ""


def idle_since(samples: Sequence[Sample], start: float, threshold: float, hold_s: float) -> float | None:
    """Start of the quiet tail: the first sample after which every ``hold_s`` window stays below ``threshold``.

    Windows use cumulative CPU-seconds, not per-sample percentages, so the short intervals that
    phase marks create do not produce spikes. None when the last full window is still busy.
    """
    pts = [(s.t, s.cpu_seconds) for s in samples if s.t >= start]
    idle_at = None
    for i, (t0, c0) in enumerate(pts):
        end = next(((t1, c1) for t1, c1 in pts[i + 1:] if t1 - t0 >= hold_s), None)
        if end is None:
            break
        busy = 100.0 * (end[1] - c0) / (end[0] - t0) >= threshold
        if busy:
            idle_at = None
        elif idle_at is None:
            idle_at = t0
    return idle_at


def measure_stop(url: str, *, pid: int | None = None, settings: StopSettings = StopSettings(),
                 server: str = "llama_lab", counter: str = OURS_COUNTER, token_times: str | None = None) -> StopResult:
    """Stream from ``url``, leave after ``settings.leave_after`` chunks, watch server ``pid`` go idle.

    ``pid`` defaults to this process (a server started with ``llama_lab.serve`` in the kernel);
    then the client's own CPU is counted too, so prefer a server subprocess for figures.
    ``token_times`` is for a server whose event loop is frozen while it generates (the old demo):
    a path returning per-token ``time.monotonic()`` stamps, read once it is idle, instead of
    reading ``counter`` at the moment the client leaves.
    """
    body = {"model": "any", "messages": [{"role": "user", "content": settings.prompt}],
            "max_tokens": settings.max_tokens, "temperature": 0, "stream": True}
    headers = {"Authorization": "Bearer x", "accept": "text/event-stream"}
    with httpx.Client() as meta, Monitor(interval_s=settings.interval_s, pid=pid) as mon:
        mon.mark("streaming")
        chunks, ended, at_leave = 0, False, 0
        # A client of its own, closed on leaving: the socket goes away mid-stream, as an aborted fetch's does.
        with httpx.Client(timeout=httpx.Timeout(300, connect=10)) as stream_client:
            with stream_client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.strip() == "data: [DONE]":
                        ended = True
                        break
                    if _content(line):
                        chunks += 1
                        if chunks >= settings.leave_after:
                            break
                if token_times is None:
                    at_leave = read_counter(url, counter, meta)
        leave_clock = time.monotonic()
        mon.mark(None)
        leave_t = next(p.end for p in reversed(mon.phases) if p.name == "streaming")
        curve: list[tuple[float, int]] = [(0.0, 0)]
        idle_t = None
        while True:
            time.sleep(settings.poll_s)
            now = mon.elapsed()
            if token_times is None:
                with contextlib.suppress(httpx.HTTPError):
                    curve.append((now - leave_t, read_counter(url, counter, meta, timeout=2.0) - at_leave))
            idle_t = idle_since(mon.samples, leave_t, settings.idle_cpu_percent, settings.idle_hold_s)
            covered = now >= leave_t + settings.window_s + settings.interval_s
            if (idle_t is not None and covered and now >= idle_t + settings.idle_hold_s) or now - leave_t > settings.watch_s:
                break
        if token_times is None:
            final = read_counter(url, counter, meta)
        else:  # waits for the end of the answer if the server is still busy: its loop answers nothing before
            stamps = sorted(meta.get(url + token_times, timeout=600).json()["times"])
            at_leave, final = sum(t <= leave_clock for t in stamps), len(stamps)
            curve += [(t - leave_clock, i + 1) for i, t in enumerate(stamps[at_leave:])]
    end_t = mon.samples[-1].t
    mon.add_phase("after leave: generating", leave_t, idle_t if idle_t is not None else end_t)
    if idle_t is not None:
        mon.add_phase("idle", idle_t, end_t)
    window = mon.summary(leave_t, leave_t + settings.window_s)
    return StopResult(server=server, url=url, pid=mon.pid, settings=settings, chunks_before_leave=chunks,
                      leave_t=leave_t, tokens_at_leave=at_leave, tokens_final=final, idle_t=idle_t,
                      window_cpu_seconds=window.cpu_seconds, ended_before_leave=ended, token_curve=curve, monitor=mon)


# ---------------------------------------------------------------- servers as subprocesses

class ServerProcess:
    """A server subprocess on a free 127.0.0.1 port: started, health-checked, stopped, its log kept."""

    def __init__(self, argv: Sequence[str], *, threads: int | None = None, startup_timeout_s: float = 240.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [a.format(port=self.port, python=sys.executable) for a in argv]
        self.env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.startup_timeout_s = startup_timeout_s
        self._log = tempfile.NamedTemporaryFile(prefix="stopbench-", suffix=".log", delete=False)
        self.popen: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def __enter__(self) -> "ServerProcess":
        logger.info("starting %s", " ".join(self.argv))
        self.popen = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.url, self.popen, timeout=self.startup_timeout_s, interval=0.3)
        except (RuntimeError, TimeoutError) as exc:
            message = f"{' '.join(self.argv[1:3])}: {exc}:\n{self.log()}"
            self.__exit__()
            raise type(exc)(message) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:  # the old demo's non-daemon generate thread can hold the process up to max_tokens
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)

    def log(self, last: int = 40) -> str:
        """The last lines the server printed (kept in a temporary file until ``__exit__``)."""
        self._log.flush()
        return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-last:])


@dataclasses.dataclass(frozen=True)
class ServerKind:
    """How to launch one server under test and which ``/metrics`` counter counts its tokens."""

    argv: tuple[str, ...]
    counter: str
    token_times: str | None = None  # see measure_stop


SERVERS = {
    "llama_lab": ServerKind(("{python}", "-m", "llama_lab", "serve", "--model", "{model}", "--port", "{port}",
                             "--log-level", "warning"), OURS_COUNTER),
    "old demo": ServerKind(("{python}", str(OLD_DEMO), "--model", "{model}", "--port", "{port}"), OLD_COUNTER,
                           token_times="/token_times"),
}


def run_server(name: str, settings: StopSettings = StopSettings()) -> StopResult:
    """Start one kind of server as a subprocess, run the experiment against it, stop it."""
    kind = SERVERS[name]
    if name == "old demo" and not OLD_DEMO.is_file():
        raise FileNotFoundError(f"{OLD_DEMO} is missing: the old demo reproduction lives in the repository's bench/")
    argv = [a.replace("{model}", settings.model) for a in kind.argv]
    with ServerProcess(argv, threads=settings.threads) as proc:
        result = measure_stop(proc.url, pid=proc.pid, settings=settings, server=name, counter=kind.counter,
                              token_times=kind.token_times)
        result.log = proc.log()
    return result


def compare(settings: StopSettings = StopSettings(), servers: Sequence[str] = ("llama_lab", "old demo")) -> list[StopResult]:
    """The experiment on each server in turn, one subprocess each, same settings."""
    return [run_server(name, settings) for name in servers]


# ---------------------------------------------------------------- reporting

def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def to_frame(results: Sequence[StopResult]) -> "pd.DataFrame":
    """Every server's timeline in one frame (``server`` and ``since_leave_s`` columns)."""
    import pandas as pd

    return pd.concat([r.to_frame() for r in results], ignore_index=True)


def table_frame(results: Sequence[StopResult]) -> "pd.DataFrame":
    """One row per server: the figures of ``format_table``."""
    import pandas as pd

    return pd.DataFrame([r.summary() for r in results]).set_index("server")


def format_table(results: Sequence[StopResult]) -> str:
    """The comparison as text: tokens after the client left, seconds to idle, CPU-seconds afterwards."""
    if not results:
        return "(no results)"
    s = results[0].settings
    head = (f"client leaves after {s.leave_after} chunks of a {s.max_tokens}-token answer; "
            f"idle = CPU below {s.idle_cpu_percent:g}% of a core for {s.idle_hold_s:g} s")
    cols = ["server", "tokens after leave", "seconds to idle", f"CPU-s in {s.window_s:g} s after"]
    rows = []
    for r in results:
        idle = f"> {r.settings.watch_s:g} (still busy)" if r.still_busy else f"{r.seconds_to_idle:.2f}"
        note = " (answer ended before the leave)" if r.ended_before_leave else ""
        rows.append([r.server + note, str(r.tokens_after_leave), idle, f"{r.window_cpu_seconds:.2f}"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def summary_json(results: Sequence[StopResult]) -> dict[str, Any]:
    settings = dataclasses.asdict(results[0].settings) if results else {}
    return {"settings": settings, "results": [r.summary() for r in results]}


def plot(results: Sequence[StopResult], title: str | None = None) -> "Figure":
    """CPU and tokens generated, both against seconds since the client left, one line per server."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), layout="constrained")
    ax_cpu, ax_tok = fig.subplots(2, 1, sharex=True)
    for r in results:
        df = r.to_frame().dropna(subset=["cpu_percent_avg"])
        ax_cpu.plot(df["since_leave_s"], df["cpu_percent_avg"], label=f"{r.server} (pid {r.pid})")
        xs, ys = zip(*r.token_curve)
        ax_tok.step(xs, ys, where="post", label=f"{r.server}: {r.tokens_after_leave} tokens after leave")
    if results:
        thr = results[0].settings.idle_cpu_percent
        ax_cpu.axhline(thr, color="gray", linestyle=":", label=f"idle threshold {thr:g}%")
    for ax in (ax_cpu, ax_tok):
        ax.axvline(0, color="black", linestyle="--", linewidth=1)
        ax.legend(loc="upper right", fontsize="small")
    ax_cpu.set_ylabel("server CPU % (100 = one core)")
    ax_tok.set_ylabel("tokens generated since leave")
    ax_tok.set_xlabel("seconds since the client left (dashed line)")
    fig.suptitle(title or "Stop button: what the server does after the client closes the stream", fontsize="medium")
    return fig


# ---------------------------------------------------------------- the interactive panel

class StopPanel:
    """Start / Stop buttons for a notebook: stream tokens live, then watch the server after Stop.

    Everything a background thread shows goes through the ``Output`` widgets' own methods
    (``append_stdout``, ``outputs``): ``with out:`` from another thread would send the output to
    whichever cell happens to be running. ``start()`` / ``stop()`` are what the buttons call, so a
    headless run can press them from code.
    """

    def __init__(self, url: str, *, pid: int | None = None, counter: str = OURS_COUNTER,
                 prompt: str = LONG_PROMPT, max_tokens: int = 400, window_s: float = 30.0,
                 refresh_s: float = 1.0) -> None:
        import ipywidgets as w

        self.url, self.counter, self.prompt, self.max_tokens = url, counter, prompt, max_tokens
        self.window_s, self.refresh_s = window_s, refresh_s
        self.monitor = Monitor(interval_s=0.2, pid=pid).start()
        self.start_button = w.Button(description="Start", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.status = w.HTML("idle")
        self.text = w.Output(layout=w.Layout(height="160px", overflow="auto", border="1px solid #ccc"))
        self.chart = w.Output()
        self.widget = w.VBox([w.HBox([self.start_button, self.stop_button, self.status]), self.text, self.chart])
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.tokens = 0
        self.tokens_at_stop: int | None = None
        self.stopped_t: float | None = None
        self._leave = threading.Event()
        self._closed = threading.Event()
        self._stream: threading.Thread | None = None
        self._chart = threading.Thread(target=self._chart_loop, name="stop-panel-chart", daemon=True)
        self._chart.start()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def start(self) -> None:
        """What the Start button does: one long streaming chat, shown token by token."""
        if self._stream is not None and self._stream.is_alive():
            return
        self._leave.clear()
        self.tokens, self.tokens_at_stop, self.stopped_t = 0, None, None
        self.text.outputs = ()
        self.start_button.disabled, self.stop_button.disabled = True, False
        self.monitor.mark("streaming")
        self._stream = threading.Thread(target=self._stream_loop, name="stop-panel-stream", daemon=True)
        self._stream.start()

    def stop(self) -> None:
        """What the Stop button does: close the connection, like NextChat's browser build."""
        self._leave.set()
        if self._stream is not None:
            self._stream.join(timeout=30)

    def server_tokens_since_stop(self) -> int | None:
        """Tokens the server generated after Stop, by its own counter."""
        if self.tokens_at_stop is None:
            return None
        return read_counter(self.url, self.counter) - self.tokens_at_stop

    def close(self) -> None:
        """Stop the stream, the chart thread and the monitor."""
        self.stop()
        self._closed.set()
        self._chart.join(timeout=10)
        self.monitor.stop()

    def _stream_loop(self) -> None:
        body = {"model": "any", "messages": [{"role": "user", "content": self.prompt}], "max_tokens": self.max_tokens,
                "temperature": 0.7, "stream": True}
        self.status.value = "streaming..."
        try:
            with httpx.Client(timeout=httpx.Timeout(300, connect=10)) as client:
                with client.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                                   headers={"Authorization": "Bearer x"}) as resp:
                    resp.raise_for_status()
                    for line in resp.iter_lines():
                        text = _content(line)
                        if text:
                            self.tokens += 1
                            self.text.append_stdout(text)
                        if self._leave.is_set():
                            break
                    if self._leave.is_set():
                        self.tokens_at_stop = read_counter(self.url, self.counter)
        except Exception as exc:  # shown in the panel, not lost in a thread
            self.text.append_stderr(f"\n[{type(exc).__name__}: {exc}]\n")
        self.stopped_t = self.monitor.elapsed()
        self.monitor.mark("after stop" if self._leave.is_set() else None)
        how = "you pressed Stop" if self._leave.is_set() else "the answer ended"
        self.status.value = f"{how} after {self.tokens} chunks; watching the server..."
        self.start_button.disabled, self.stop_button.disabled = False, True

    def _chart_loop(self) -> None:
        while not self._closed.wait(self.refresh_s):
            try:
                self._draw()
            except Exception:  # a drawing glitch must not kill the panel
                logger.exception("stop panel: chart update failed")

    def _draw(self) -> None:
        from matplotlib.figure import Figure

        df = self.monitor.to_frame()
        df = df[df["t"] >= df["t"].max() - self.window_s]
        fig = Figure(figsize=(7, 2.2), dpi=80, layout="constrained")
        ax = fig.subplots()
        ax.plot(df["t"], df["cpu_percent"], color="tab:green")
        if self.stopped_t is not None:
            ax.axvline(self.stopped_t, color="black", linestyle="--", linewidth=1)
        ax.set_ylim(0, max(105.0, float(df["cpu_percent"].max() or 0) + 5))
        ax.set_ylabel("CPU %")
        ax.set_xlabel(f"seconds (pid {self.monitor.pid}; dashed: Stop)")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        if self.tokens_at_stop is not None:
            after = self.server_tokens_since_stop()
            self.status.value = (f"stopped after {self.tokens} chunks; the server generated "
                                 f"<b>{after}</b> token(s) after Stop")
        # One image, replaced in place: the same dict append_display_data builds, without the growing list.
        import base64

        self.chart.outputs = ({"output_type": "display_data", "metadata": {},
                               "data": {"image/png": base64.b64encode(buf.getvalue()).decode(),
                                        "text/plain": "<CPU chart>"}},)
