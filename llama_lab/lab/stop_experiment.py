"""The stop-button experiment: does the server stop generating when the client leaves?

A client streams a long chat completion, reads ``leave_after`` chunks and closes the connection,
as NextChat's stop button aborts its fetch. A ``Monitor`` watches the server process, and the
server's own counter (``/metrics``) says how many tokens it generated after the client left.
``compare()`` runs llama_lab's server and a reproduction of the old demo's pattern
(``llama_lab.lab.old_demo_server``) as subprocesses, the same way, so their timelines sit side by side:
the old pattern stays busy until ``max_tokens``; ours is idle within one decoding step.

    results = compare(StopSettings.quick())
    print(format_table(results)); plot(results)

``llama_lab.lab.widgets.StopPanel`` is the interactive version for a notebook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Sequence

import httpx

from llama_lab.profiling import Monitor, Sample
from llama_lab.lab import round_or_none
from llama_lab.web.launcher import ServerProcess

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

LONG_PROMPT = "Write a very long story about a lighthouse keeper."  # SmolLM2 greedy: runs past 300 tokens
OURS_COUNTER = "llama_lab_engine_steps"  # one decode step = one token while a single request runs
OLD_COUNTER = "old_demo_generated_tokens"


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
                "seconds_to_idle": round_or_none(self.seconds_to_idle, 2), "still_busy": self.still_busy,
                "cpu_seconds_after": round_or_none(self.window_cpu_seconds, 2), "window_s": self.settings.window_s,
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


def content_of(line: str) -> str:
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
                    if content_of(line):
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

@dataclasses.dataclass(frozen=True)
class ServerKind:
    """How to launch one server under test and which ``/metrics`` counter counts its tokens."""

    argv: tuple[str, ...]
    counter: str
    token_times: str | None = None  # see measure_stop


SERVERS = {
    "llama_lab": ServerKind(("{python}", "-m", "llama_lab", "serve", "--model", "{model}", "--port", "{port}",
                             "--log-level", "warning"), OURS_COUNTER),
    "old demo": ServerKind(("{python}", "-m", "llama_lab.lab.old_demo_server", "--model", "{model}", "--port", "{port}"), OLD_COUNTER,
                           token_times="/token_times"),
}


def run_server(name: str, settings: StopSettings = StopSettings()) -> StopResult:
    """Start one kind of server as a subprocess, run the experiment against it, stop it."""
    kind = SERVERS[name]
    argv = [a.replace("{model}", settings.model) for a in kind.argv]
    with ServerProcess(argv, threads=settings.threads, name=name) as proc:
        result = measure_stop(proc.url, pid=proc.pid, settings=settings, server=name, counter=kind.counter,
                              token_times=kind.token_times)
        result.log = proc.log()
    return result


def compare(settings: StopSettings = StopSettings(), servers: Sequence[str] = ("llama_lab", "old demo")) -> list[StopResult]:
    """The experiment on each server in turn, one subprocess each, same settings."""
    return [run_server(name, settings) for name in servers]


# ---------------------------------------------------------------- reporting

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
