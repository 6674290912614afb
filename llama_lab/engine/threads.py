"""How many threads the engine's CPU work uses, and when that changes.

A decode step crosses hundreds of OpenMP barriers, and each one waits for the slowest thread of the
team. When another process (a compile, a notebook cell, a browser) shares a core with one of the
engine's threads, that thread runs one scheduler time slice in two and every barrier waits for it:
measured on a 2-core machine, one busy process took the default two threads from 33.9 to 0.5 tok/s,
while one thread kept 21.7 of its 22.2. So the engine runs as many threads as there are cores that
nothing else is using, and no more:

- at start, the cores it may use: CPU affinity (``taskset``) and the cgroup CPU quota (``cpu.max``,
  or v1's ``cpu.cfs_quota_us``: what Docker's ``--cpus`` and Kubernetes' limits set), which torch's
  own default ignores;
- while it decodes, the CPU time others used on those cores over the last half second
  (``/proc/stat`` for the cores, minus the engine's own threads from ``/proc/self/task``, so a busy
  thread in the engine's own process, such as a notebook cell, counts as someone else). It gives a
  core up as soon as others use more than half of one, and takes it back after two quiet seconds.

Step time alone cannot say when to take a core back: with one thread, a busy neighbour on the other
core does not slow the step at all. ``docs/engine.md`` has the measurements.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import itertools
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

__all__ = ["CpuLimits", "CpuSample", "Reason", "ThreadPolicy", "cpu_limits", "cgroup_cpu_quota", "parse_cpu_max",
           "read_cpu", "name_current_thread", "engine_policy", "hand_over_the_gil_sooner"]


# ---------------------------------------------------------------- limits known at start


def parse_cpu_max(text: str) -> float | None:
    """Cores allowed by a cgroup v2 ``cpu.max`` ("150000 100000" -> 1.5; "max 100000" -> None)."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return int(parts[0]) / period if period > 0 else None


def _parse_cfs(quota_text: str, period_text: str) -> float | None:
    """Cores allowed by cgroup v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: no limit)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    return quota / period if quota > 0 and period > 0 else None


def _mounts(mountinfo: str) -> list[tuple[str, Path, str, set[str]]]:
    """(root inside the hierarchy, mount point, fs type, super options) of each cgroup mount."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((fields[3], Path(fields[4]), tail[0], set(tail[2].split(","))))
    return out


def cgroup_cpu_quota(proc: Path = Path("/proc/self")) -> float | None:
    """The tightest CPU quota, in cores, on this process's cgroup or any parent; None when there is none.

    Reads the hierarchies ``proc/mountinfo`` names (v2's ``cpu.max``; v1's ``cpu`` controller), so a
    container's namespaced view and a host's hybrid v1/v2 layout both work; tests pass a fake ``proc``.
    """
    try:
        membership = (proc / "cgroup").read_text()
        mounts = _mounts((proc / "mountinfo").read_text())
    except OSError:
        return None
    paths: dict[str, str] = {}  # "" for v2, else each v1 controller -> this process's cgroup path
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    found: list[float] = []
    for root, mount_point, fstype, options in mounts:
        controller = "" if fstype == "cgroup2" else "cpu"
        if controller not in paths or (controller == "cpu" and "cpu" not in options):
            continue
        relative = os.path.relpath(paths[controller], root)
        directory = mount_point if relative.startswith("..") else mount_point / relative
        while True:  # the cgroup and each parent up to the mount point: the tightest limit wins
            try:
                if fstype == "cgroup2":
                    quota = parse_cpu_max((directory / "cpu.max").read_text())
                else:
                    quota = _parse_cfs((directory / "cpu.cfs_quota_us").read_text(),
                                       (directory / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                quota = None
            if quota is not None:
                found.append(quota)
            if directory == mount_point or mount_point not in directory.parents:
                break
            directory = directory.parent
    return min(found) if found else None


@dataclasses.dataclass(frozen=True)
class CpuLimits:
    """The cores this process may use, as the kernel sees them at start."""

    cpus: frozenset[int]  # sched_getaffinity: where the scheduler may run it
    quota: float | None  # cgroup quota in cores; None: unlimited
    torch_threads: int  # torch's own count in the calling thread (OMP_NUM_THREADS, physical cores, or set_num_threads)

    @property
    def threads(self) -> int:
        """Threads that fit: a quota of 1.5 cores gets one thread (two would be throttled in turn)."""
        fit = min(len(self.cpus), self.torch_threads)
        if self.quota is not None:
            fit = min(fit, math.floor(self.quota))
        return max(1, fit)

    def describe(self) -> str:
        quota = "no cgroup CPU quota" if self.quota is None else f"a cgroup quota of {self.quota:g} CPUs"
        return f"{len(self.cpus)} CPUs in its affinity, {quota}, torch's default {self.torch_threads}"


def cpu_limits() -> CpuLimits:
    """Affinity, cgroup quota and torch's count for this process, read now."""
    import torch

    return CpuLimits(cpus=frozenset(os.sched_getaffinity(0)), quota=cgroup_cpu_quota(),
                     torch_threads=torch.get_num_threads())


# ---------------------------------------------------------------- the contention signal


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment: all work on the engine's cores, and the engine's own share."""

    busy: float
    ours: float


def name_current_thread(name: str) -> None:
    """Give the calling OS thread a name (15 bytes at most); threads it starts later inherit it.

    The engine names its thread before its first parallel region, so the OpenMP workers it spawns carry
    the same name: that is how ``read_cpu`` tells the engine's CPU time from everyone else's, the
    process's other threads included. It also makes ``top -H`` readable. No-op where prctl is missing.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_cpu(cpus: frozenset[int], thread_name: str) -> CpuSample:
    """Busy seconds on ``cpus`` since boot and the CPU seconds of this process's threads named ``thread_name``.

    Steal counts (another guest had the core). Time of processes at a lower priority than ours (``nice``
    time, when we run at nice 0) does not: the scheduler hands their core back the moment our thread
    wakes, so a niced compiler or test run beside the server costs it little, and giving a core up to
    it would halve decoding for nothing.
    """
    import psutil

    count_nice = os.getpriority(os.PRIO_PROCESS, 0) > 0  # we are niced ourselves: nice time is our peers'
    busy = 0.0
    for index, t in enumerate(psutil.cpu_times(percpu=True)):
        if index in cpus:
            busy += (t.user + (t.nice if count_nice else 0.0) + t.system + getattr(t, "irq", 0.0)
                     + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0))
    ticks = 0
    name = thread_name[:15]
    for task in os.scandir("/proc/self/task"):
        try:
            with open(f"{task.path}/stat", "rb") as f:
                stat = f.read().decode()
        except OSError:  # the thread ended between the listing and the read
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm == name:
            ticks += int(rest[11]) + int(rest[12])  # utime, stime
    return CpuSample(busy=busy, ours=ticks / _TICK)


# ---------------------------------------------------------------- the policy


class Reason(str, enum.Enum):
    """Why the engine runs the threads it runs (a label of /metrics, a field of /health)."""

    PINNED = "pinned"  # --threads, LLAMA_LAB_THREADS or OMP_NUM_THREADS
    LIMIT = "cpu_limit"  # every core this process may use
    BUSY = "busy"  # other work is using some of those cores


class ThreadPolicy:
    """Chooses the engine's thread count from the cores it may use and what others use of them.

    ``update()`` is called by the engine thread each loop turn while it has work; it samples at most
    every ``interval`` seconds and returns the count to run. Going down takes one sample (a busy
    neighbour costs the two-thread step tens of times its length); going up takes ``quiet_for``
    seconds of samples that all leave a core free (a short quiet spell between a compiler's jobs does
    not flip the count back and forth). The clock and the sampler are parameters so the tests can
    drive the decisions without timing anything.
    """

    def __init__(self, limits: CpuLimits, *, pinned: int | None = None, pinned_by: str = "--threads",
                 sample: Callable[[], CpuSample] | None = None, clock: Callable[[], float] = time.monotonic,
                 interval: float = 0.5, quiet_for: float = 2.0, give_up_above: float = 0.5,
                 take_back_below: float = 0.4) -> None:
        self.limits = limits
        self.max_threads = pinned if pinned else limits.threads
        self.pinned = bool(pinned)
        self.pinned_by = pinned_by
        self.threads = self.max_threads
        self.reason = Reason.PINNED if self.pinned else Reason.LIMIT
        self.others: float | None = None  # cores' worth of CPU others used in the last sample
        self.changes = 0
        self._sample = sample
        self._clock = clock
        self.interval, self.quiet_for = interval, quiet_for
        self.give_up_above, self.take_back_below = give_up_above, take_back_below
        self._last: tuple[float, CpuSample] | None = None
        self._quiet_since: float | None = None
        self._idle_since: float | None = None

    def update(self) -> int:
        """The thread count to run now (cheap: a clock read, unless a sample is due)."""
        if self.pinned or self._sample is None or self.max_threads == 1 and self.threads == 1:
            return self.threads
        now = self._clock()
        idle_since, self._idle_since = self._idle_since, None
        if idle_since is not None and now - idle_since > self.quiet_for:
            self._last = self._quiet_since = None  # a long idle spell: its average would hide what changed since
        if self._last is not None and now - self._last[0] < self.interval:
            return self.threads
        sample = self._sample()
        previous, self._last = self._last, (now, sample)
        if previous is None:
            return self.threads  # the first sample: a baseline, nothing to compare yet
        elapsed = now - previous[0]
        others = max(0.0, (sample.busy - previous[1].busy) - (sample.ours - previous[1].ours)) / elapsed
        self.others = others
        cores = len(self.limits.cpus)
        fits_now = self._fit(cores - others + self.give_up_above)
        if fits_now < self.threads:
            self._set(fits_now, now, f"others used {others:.2f} of {cores} CPUs")
            self._quiet_since = None
            return self.threads
        if self._fit(cores - others + self.take_back_below) > self.threads:
            if self._quiet_since is None:
                self._quiet_since = previous[0]
            if now - self._quiet_since >= self.quiet_for:
                self._set(min(self.threads + 1, self.max_threads), now, f"others used {others:.2f} of {cores} CPUs")
                self._quiet_since = now if self.threads < self.max_threads else None
        else:
            self._quiet_since = None
        return self.threads

    def pause(self) -> None:
        """The engine has no work. A short gap between requests keeps the window going (a chat's requests
        are often shorter than a sample, and the quiet spell must be able to span them); after an idle
        spell longer than ``quiet_for`` the next ``update`` starts afresh."""
        if self._idle_since is None:
            self._idle_since = self._clock()

    def _fit(self, free: float) -> int:
        return max(1, min(self.max_threads, math.floor(free)))

    def _set(self, threads: int, now: float, why: str) -> None:
        if threads == self.threads:
            return
        logger.info("engine threads %d -> %d (%s)", self.threads, threads, why)
        self.threads = threads
        self.reason = Reason.LIMIT if threads == self.max_threads else Reason.BUSY
        self.changes += 1

    def describe(self) -> dict[str, object]:
        """What /health shows: the count, its ceiling, and why."""
        if self.pinned:
            why = f"pinned to {self.threads} by {self.pinned_by}"
        elif self.reason is Reason.BUSY:
            why = (f"other work used {self.others:.2f} of the {len(self.limits.cpus)} CPUs; "
                   f"a core comes back after {self.quiet_for:g} s under {self.take_back_below:g} CPU of others' use")
        else:
            why = f"every core this process may use ({self.limits.describe()})"
        return {"threads": self.threads, "max_threads": self.max_threads, "reason": self.reason.value, "why": why,
                "others_cpu": None if self.others is None else round(self.others, 2), "changes": self.changes,
                "cpus": len(self.limits.cpus), "cgroup_quota": self.limits.quota}


_engine_numbers = itertools.count(1)


def engine_policy(threads: int = 0) -> tuple[ThreadPolicy, str]:
    """The policy for a new engine and the name its thread takes (``name_current_thread``).

    ``threads`` > 0 pins the count (``--threads``); so does ``OMP_NUM_THREADS``, the variable people
    already use for this. Otherwise the count follows the limits at start and the load while decoding.
    """
    name = f"llama-lab-eng{next(_engine_numbers)}"
    limits = cpu_limits()
    pinned_by = "--threads / LLAMA_LAB_THREADS"
    if not threads:
        try:
            threads = int(os.environ.get("OMP_NUM_THREADS", "0").split(",")[0])
            pinned_by = "OMP_NUM_THREADS"
        except ValueError:
            threads = 0
    policy = ThreadPolicy(limits, pinned=max(0, threads) or None, pinned_by=pinned_by,
                          sample=lambda: read_cpu(limits.cpus, name))
    logger.info("engine threads: %s", policy.describe()["why"])
    return policy, name


def hand_over_the_gil_sooner(seconds: float = 0.001) -> Callable[[], None]:
    """Shorten Python's GIL switch interval (5 ms by default) for an in-process server; returns the undo.

    In a notebook the engine shares the interpreter with the cells. A cell in pure Python holds the GIL,
    and the engine thread takes it back dozens of times per token (every torch call releases it), each
    time after a whole switch interval: measured with ``bench/contention_bench.py --sides kernel``, one
    stream fell from ~106 to 1.7-4.6 tok/s while a cell computed; with 1 ms it kept 39.9 (0.2 ms: 45.5,
    not worth five times the hand-overs). The interval matters only while another thread waits for the
    GIL, so an idle server costs the cell nothing.
    """
    import sys

    previous = sys.getswitchinterval()
    if previous > seconds:
        sys.setswitchinterval(seconds)
        logger.info("Python's GIL switch interval: %g ms -> %g ms while the server runs in this process "
                    "(a busy cell would otherwise stall decoding)", previous * 1e3, seconds * 1e3)
    return lambda: sys.setswitchinterval(previous)
