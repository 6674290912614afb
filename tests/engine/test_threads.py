"""The engine's thread count: CPU limits read at start (affinity, cgroup quota) and the policy that
gives cores up to other work and takes them back. Decisions are driven by an injected clock and CPU
signal; nothing here times anything."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from llama_lab.engine import Engine, SamplingParams
from llama_lab.engine.threads import (CpuLimits, CpuSample, Reason, ThreadPolicy, cgroup_cpu_quota, name_current_thread,
                                      parse_cpu_max, read_cpu)
from llama_lab.web.launcher import ServerProcess, llama_lab_command

# ---------------------------------------------------------------- cgroup quota


@pytest.mark.parametrize("text,cores", [("max 100000\n", None), ("150000 100000\n", 1.5), ("200000 100000", 2.0),
                                        ("50000 100000", 0.5), ("max", None), ("100000 50000", 2.0)])
def test_cpu_max_is_read_as_cores(text, cores):
    assert parse_cpu_max(text) == cores


def _fake_proc(tmp_path: Path, cgroup: str, mounts: list[tuple[str, str, str, str]]) -> Path:
    """A /proc/self with ``cgroup`` and a mountinfo listing (root, mount point, fstype, super options)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [f"{30 + i} 1 0:{20 + i} {root} {point} rw,nosuid - {fstype} {fstype} {opts}"
             for i, (root, point, fstype, opts) in enumerate(mounts)]
    lines.insert(0, "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw")
    (proc / "mountinfo").write_text("\n".join(lines) + "\n")
    return proc


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_in_a_container(tmp_path):
    """Docker --cpus=1.5 on cgroup v2: the namespaced cgroup is '/', cpu.max at the mount point."""
    fs = tmp_path / "sys/fs/cgroup"
    _write(fs / "cpu.max", "150000 100000\n")
    proc = _fake_proc(tmp_path, "0::/\n", [("/", str(fs), "cgroup2", "rw,nsdelegate")])
    assert cgroup_cpu_quota(proc) == 1.5


def test_cgroup_v2_a_parent_limit_counts(tmp_path):
    """A Kubernetes pod's limit sits on the pod's cgroup; the container's own cpu.max says max."""
    fs = tmp_path / "sys/fs/cgroup"
    _write(fs / "cpu.max", "max 100000\n")
    _write(fs / "kubepods/pod1/cpu.max", "100000 100000\n")
    _write(fs / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    proc = _fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n", [("/", str(fs), "cgroup2", "rw")])
    assert cgroup_cpu_quota(proc) == 1.0


def test_cgroup_v2_without_a_limit(tmp_path):
    fs = tmp_path / "sys/fs/cgroup"
    _write(fs / "user.slice/cpu.max", "max 100000\n")
    proc = _fake_proc(tmp_path, "0::/user.slice\n", [("/", str(fs), "cgroup2", "rw")])
    assert cgroup_cpu_quota(proc) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    fs = tmp_path / "sys/fs/cgroup/cpu,cpuacct"
    _write(fs / "docker/abc/cpu.cfs_quota_us", "50000\n")
    _write(fs / "docker/abc/cpu.cfs_period_us", "100000\n")
    _write(fs / "cpu.cfs_quota_us", "-1\n")
    _write(fs / "cpu.cfs_period_us", "100000\n")
    proc = _fake_proc(tmp_path, "3:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n",
                      [("/", str(fs), "cgroup", "rw,cpu,cpuacct"),
                       ("/", str(tmp_path / "sys/fs/cgroup/memory"), "cgroup", "rw,memory")])
    assert cgroup_cpu_quota(proc) == 0.5


def test_cgroup_v1_hybrid_host_without_a_quota(tmp_path):
    """This machine's layout: v1 controllers plus an empty v2 'unified' hierarchy; no quota anywhere."""
    base = tmp_path / "sys/fs/cgroup"
    _write(base / "cpu/cpu.cfs_quota_us", "-1\n")
    _write(base / "cpu/cpu.cfs_period_us", "100000\n")
    (base / "unified").mkdir(parents=True)
    proc = _fake_proc(tmp_path, "2:cpuacct:/\n1:cpu:/\n0::/\n",
                      [("/", str(base / "cpu"), "cgroup", "rw,cpu"), ("/", str(base / "cpuacct"), "cgroup", "rw,cpuacct"),
                       ("/", str(base / "unified"), "cgroup2", "rw")])
    assert cgroup_cpu_quota(proc) is None


def test_cgroup_unreadable_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "missing") is None


@pytest.mark.parametrize("cpus,quota,torch_threads,threads", [
    ({0, 1}, None, 2, 2), ({0}, None, 2, 1), ({0, 1, 2, 3}, 1.5, 4, 1), ({0, 1}, 0.5, 2, 1),
    ({0, 1, 2, 3, 4, 5, 6, 7}, None, 4, 4), ({0, 1, 2, 3}, 3.0, 4, 3)])
def test_threads_fit_affinity_quota_and_torch(cpus, quota, torch_threads, threads):
    assert CpuLimits(frozenset(cpus), quota, torch_threads).threads == threads


# ---------------------------------------------------------------- the policy, driven by a fake clock and signal


class FakeMachine:
    """A clock and a CPU sampler: ``others`` cores of other work, ``ours`` cores of the engine's."""

    def __init__(self) -> None:
        self.now = 100.0
        self.others = 0.0
        self.ours = 2.0
        self._busy = self._ours = 0.0

    def clock(self) -> float:
        return self.now

    def sample(self) -> CpuSample:
        return CpuSample(busy=self._busy, ours=self._ours)

    def run(self, seconds: float, policy: ThreadPolicy, every: float = 0.1) -> list[int]:
        """Advance time in engine turns of ``every`` seconds, calling the policy each turn."""
        seen = []
        for _ in range(round(seconds / every)):
            self.now += every
            self._busy += (self.others + min(self.ours, policy.threads)) * every
            self._ours += min(self.ours, policy.threads) * every
            seen.append(policy.update())
        return seen


def _policy(machine: FakeMachine, cpus: int = 2, **kw) -> ThreadPolicy:
    return ThreadPolicy(CpuLimits(frozenset(range(cpus)), None, cpus), sample=machine.sample, clock=machine.clock, **kw)


def test_a_quiet_machine_keeps_every_core():
    m = FakeMachine()
    p = _policy(m)
    assert m.run(10, p) == [2] * 100
    assert p.reason is Reason.LIMIT and p.changes == 0 and p.others == pytest.approx(0.0)


def test_a_busy_process_takes_a_core_within_one_sample():
    m = FakeMachine()
    p = _policy(m)
    m.run(2, p)
    m.others = 0.7  # a busy loop sharing two cores with two spinning engine threads gets ~2/3 of one
    seen = m.run(1.5, p)
    assert seen[-1] == 1 and seen.index(1) <= 10  # the first sample that covers the busy spell
    assert p.reason is Reason.BUSY
    assert "0.70 of the 2 CPUs" in p.describe()["why"]


def test_two_busy_processes_still_leave_one_thread():
    m = FakeMachine()
    p = _policy(m)
    m.others = 1.4
    assert m.run(3, p)[-1] == 1
    m.others = 2.0
    assert m.run(3, p)[-1] == 1


def test_half_a_core_of_others_is_tolerated():
    """A browser tab or a server's own HTTP thread (well under half a core) must not cost a core."""
    m = FakeMachine()
    p = _policy(m)
    m.others = 0.4
    assert set(m.run(10, p)) == {2}


def test_the_core_comes_back_after_two_quiet_seconds_not_before():
    m = FakeMachine()
    p = _policy(m)
    m.others = 1.0
    m.run(2, p)
    assert p.threads == 1
    m.others = 0.0
    seen = m.run(4, p)
    back = seen.index(2)
    assert 1.9 <= (back + 1) * 0.1 <= 3.0  # two seconds of quiet samples, plus at most one sample's delay
    assert set(seen[back:]) == {2} and p.reason is Reason.LIMIT


def test_a_short_quiet_spell_does_not_flip_the_count():
    """A compiler between two jobs: one quiet second does not bring the core back."""
    m = FakeMachine()
    p = _policy(m)
    for _ in range(5):
        m.others = 1.0
        m.run(1.5, p)
        m.others = 0.0
        assert set(m.run(1.0, p)) == {1}
    assert p.changes == 1


def test_in_between_load_neither_gives_up_nor_takes_back():
    """Between the two thresholds (0.4 and 0.5 of a core) the count stays where it is: no flapping."""
    m = FakeMachine()
    p = _policy(m)
    m.others = 0.45
    assert set(m.run(5, p)) == {2}
    m.others = 1.0
    m.run(1, p)
    m.others = 0.45
    assert set(m.run(5, p)) == {1}


def test_more_cores_give_up_one_per_busy_core():
    m = FakeMachine()
    m.ours = 8
    p = _policy(m, cpus=8)
    m.others = 2.9
    assert m.run(2, p)[-1] == 5
    m.others = 0.0
    seen = m.run(10, p)
    assert seen[-1] == 8 and sorted(set(seen)) == [5, 6, 7, 8]  # one core back per quiet spell


def test_a_pinned_count_never_moves():
    m = FakeMachine()
    p = ThreadPolicy(CpuLimits(frozenset({0, 1}), None, 2), pinned=2, sample=m.sample, clock=m.clock)
    m.others = 2.0
    assert set(m.run(5, p)) == {2}
    assert p.reason is Reason.PINNED and "pinned to 2" in p.describe()["why"]


def test_an_idle_spell_is_not_a_sample():
    """Busy neighbours while the engine had nothing to do say nothing about the next request's start:
    after ``pause()`` the first sample is a baseline, and the decision uses only time spent decoding."""
    m = FakeMachine()
    p = _policy(m)
    m.run(1, p)
    p.pause()
    m.others = 2.0
    m.now += 30  # idle: the engine does not call update
    m._busy += 2.0 * 30
    m.others = 0.0
    assert set(m.run(3, p)) == {2}


def test_short_requests_with_gaps_still_bring_the_core_back():
    """Requests shorter than a sample, with idle gaps between them (a chat, a benchmark loop): the quiet
    spell spans them, so the core comes back as it would under one long stream."""
    m = FakeMachine()
    p = _policy(m)
    m.others = 1.0
    m.run(2, p)
    m.others = 0.0
    for _ in range(20):
        m.run(0.3, p)  # one short request
        p.pause()
        m.now += 0.1  # the gap: the engine sleeps
        m._busy += 0.0
    assert p.threads == 2


def test_a_slow_step_still_counts_as_a_sample():
    """Under contention a two-thread step can take seconds: that window decides, it is not discarded."""
    m = FakeMachine()
    p = _policy(m)
    m.run(1, p)
    m.others = 1.0
    assert m.run(3, p, every=3.0) == [1]


# ---------------------------------------------------------------- the real signal and the real engine


def test_a_named_thread_counts_as_the_engine_and_others_do_not():
    """A busy thread in the engine's own process (a notebook cell) is someone else's work."""
    cpus = frozenset(os.sched_getaffinity(0))
    ours_name, stop = "llama-lab-t3st", threading.Event()

    def burn(name: str | None) -> None:
        if name:
            name_current_thread(name)
        while not stop.is_set():
            sum(range(10_000))

    def thread_seconds(thread: threading.Thread) -> float:
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    process = psutil.Process()
    start, process_start = read_cpu(cpus, ours_name), sum(process.cpu_times()[:2])
    named = threading.Thread(target=burn, args=(ours_name,))
    other = threading.Thread(target=burn, args=(None,))  # the notebook cell: busy, not ours
    named.start()
    other.start()
    deadline = time.monotonic() + 60  # a bound for a broken build, not a timing assertion
    while ((read_cpu(cpus, ours_name).ours - start.ours < 0.05 or thread_seconds(other) < 0.05)
           and time.monotonic() < deadline):
        time.sleep(0.01)
    # both samples before the threads (and their time) end; the unnamed thread's time is the process's only
    other_seconds = thread_seconds(other)
    end, process_end = read_cpu(cpus, ours_name), sum(process.cpu_times()[:2])
    stop.set()
    named.join()
    other.join()
    assert end.ours - start.ours >= 0.05
    # the process's time less the unnamed thread's is the named one's and the main thread's (clock ticks of slack)
    assert end.ours - start.ours <= process_end - process_start - other_seconds + 0.02
    assert read_cpu(cpus, "nobody-has-this").ours == 0


def test_engine_runs_the_pinned_count(tiny_model, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with Engine(tiny_model, compile=False, threads=1) as engine:
        assert engine.call(torch.get_num_threads).result() == 1
        info = engine.describe()["threads"]
        assert info["threads"] == 1 and info["reason"] == "pinned" and "--threads" in info["why"]


def test_engine_follows_its_policy(tiny_model, monkeypatch):
    """Other work appears mid-stream: the engine thread runs one thread from the next turn on."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    m = FakeMachine()
    with Engine(tiny_model, compile=False) as engine:
        limits = CpuLimits(frozenset({0, 1}), None, 2)

        def sample() -> CpuSample:  # each engine turn is 0.2 s of a machine where others use a core
            m.now += 0.2
            m._busy += 3 * 0.2
            m._ours += 2 * 0.2
            return m.sample()

        engine.thread_policy = ThreadPolicy(limits, sample=sample, clock=m.clock, interval=0.1)
        engine.generate(tiny_model.chat_prompt_ids([{"role": "user", "content": "hi"}]),
                        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert engine.thread_policy.threads == 1
        assert engine.call(torch.get_num_threads).result() == 1
        assert engine.describe()["threads"]["reason"] == "busy"


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_taskset_pinned_server_starts_with_one_thread():
    argv = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *llama_lab_command("serve", "--model", "random:tiny")]
    server = ServerProcess(argv)
    server.env.pop("OMP_NUM_THREADS", None)  # it would pin the count; this test wants the automatic one
    server.env.pop("LLAMA_LAB_THREADS", None)
    with server:
        health = httpx.get(server.url + "/health").json()
        info = health["engine"]["threads"]
        assert info["threads"] == 1 and info["max_threads"] == 1 and info["cpus"] == 1
        assert info["reason"] == "cpu_limit"
        metrics = httpx.get(server.url + "/metrics").text
        assert "llama_lab_engine_threads 1.0" in metrics
        assert 'llama_lab_engine_threads_reason{reason="cpu_limit"} 1.0' in metrics


def test_lower_priority_work_does_not_count_as_busy(monkeypatch):
    """A niced neighbour (a compiler, a test run) yields its core when our thread wakes: its time is not
    others' use, unless we run niced ourselves (then it may be work at our own priority)."""
    from types import SimpleNamespace

    times = [SimpleNamespace(user=10.0, nice=50.0, system=2.0, irq=0.0, softirq=0.0, steal=1.0)] * 2
    monkeypatch.setattr(psutil, "cpu_times", lambda percpu: times)
    monkeypatch.setattr(os, "getpriority", lambda which, who: 0)
    assert read_cpu(frozenset({0, 1}), "nobody-has-this").busy == pytest.approx(26.0)
    monkeypatch.setattr(os, "getpriority", lambda which, who: 10)
    assert read_cpu(frozenset({0, 1}), "nobody-has-this").busy == pytest.approx(126.0)
    assert read_cpu(frozenset({1}), "nobody-has-this").busy == pytest.approx(63.0)
