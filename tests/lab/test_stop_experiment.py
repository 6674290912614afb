"""The stop-button experiment (the seed's Bug 2): llama_lab stops within a step, the old demo pattern does not."""

from __future__ import annotations

import pytest

from llama_lab.profiling import Sample
from llama_lab.lab.stop_experiment import StopSettings, compare, format_table, idle_since, plot, summary_json, table_frame


def _samples(points: list[tuple[float, float]]) -> list[Sample]:
    return [Sample(t=t, rss_bytes=0, cpu_percent=0.0, cpu_seconds=c, energy_j=float("nan"), power_w=float("nan"))
            for t, c in points]


def test_idle_since_finds_the_quiet_tail_not_a_pause():
    # busy (1 CPU-s per s) until t=2, a 0.6 s pause, busy again until t=4, then quiet
    pts, cpu = [], 0.0
    for i in range(61):
        t = i / 10
        pts.append((t, cpu))
        cpu += 0.1 if (t < 2 or 2.6 <= t < 4) else 0.0
    assert idle_since(_samples(pts), 0.0, threshold=10, hold_s=0.5) == pytest.approx(4.0)
    assert idle_since(_samples(pts[:35]), 0.0, threshold=10, hold_s=0.5) is None  # still busy at the end


@pytest.fixture(scope="module")
def results():
    return {r.server: r for r in compare(StopSettings.quick())}


@pytest.mark.slow
def test_llama_lab_stops_within_one_step(results):
    ours = results["llama_lab"]
    assert not ours.ended_before_leave, "the answer ended before the client left; use a longer prompt"
    assert ours.tokens_after_leave <= 2, ours.summary()
    assert ours.seconds_to_idle is not None and ours.seconds_to_idle < 1.5, ours.summary()
    assert ours.window_cpu_seconds < 0.5, ours.summary()


@pytest.mark.slow
def test_old_demo_pattern_keeps_generating_to_max_tokens(results):
    old, ours = results["old demo"], results["llama_lab"]
    remaining = old.settings.max_tokens - old.tokens_at_leave
    assert not old.ended_before_leave
    assert old.tokens_after_leave >= 0.8 * remaining, old.summary()
    # busy until its last token, after ours went idle: how long after depends on the CPU (1.8 s for the 91
    # tokens on a Zen 4, where this used to ask for more than 2 s)
    final = old.token_curve[-1][1] if old.token_curve else 0
    last_token_s = min((t for t, n in old.token_curve if n == final), default=0.0)  # the curve samples on after it
    assert last_token_s > ours.seconds_to_idle + 0.5, (old.summary(), ours.summary())
    assert old.seconds_to_idle is None or old.seconds_to_idle >= last_token_s - 0.3, old.summary()
    assert old.window_cpu_seconds > 5 * max(ours.window_cpu_seconds, 0.02), (old.summary(), ours.summary())
    # the user's fix is dead code: the except-CancelledError branch never runs
    assert "stop flag set" not in old.log


@pytest.mark.slow
def test_report_has_table_plot_and_json(results):
    rs = [results["llama_lab"], results["old demo"]]
    text = format_table(rs)
    assert "tokens after leave" in text and "old demo" in text
    assert list(table_frame(rs).index) == ["llama_lab", "old demo"]
    assert {"since_leave_s", "cpu_seconds", "cpu_percent_avg"} <= set(rs[0].to_frame().columns)
    assert len(plot(rs).axes) == 2
    assert summary_json(rs)["results"][1]["server"] == "old demo"
