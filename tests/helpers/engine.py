"""Engine helpers for tests: an engine that keeps its request handles, cancelling mid-stream, waiting."""

from __future__ import annotations

import queue
import time


def recording_engine(loaded, **kwargs):
    """A real Engine that also keeps every RequestHandle, so tests can read ``steps_after_cancel``."""
    from llama_lab.engine import Engine

    class RecordingEngine(Engine):
        def __init__(self, *args, **kw):
            self.handles = []
            super().__init__(*args, **kw)

        def submit(self, *args, **kw):
            handle = super().submit(*args, **kw)
            self.handles.append(handle)
            return handle

    return RecordingEngine(loaded, **kwargs)


def steps_after_cancel(handle) -> int:
    """Decode steps a request took part in after its cancel(): the stop button's promise is <= 1."""
    if handle.cancel_step is None or handle.last_step is None:
        return 0
    return max(0, handle.last_step - handle.cancel_step)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll ``predicate`` until it is truthy; fail the test with a clear message on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def cancel_after_tokens(engine, prompt_ids, params, tokens: int = 5, timeout: float = 60.0):
    """Stream a request, cancel it after ``tokens`` token deltas; return (final delta, handle)."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    handle = engine.submit(prompt_ids, params, events.put)
    seen = 0
    while seen < tokens:
        if events.get(timeout=timeout).token_ids:
            seen += 1
    handle.cancel()
    while (delta := events.get(timeout=timeout)).finish_reason is None:
        pass
    return delta, handle


def wait_idle(engine, timeout: float = 15.0) -> None:
    wait_until(lambda: engine.stats.running == 0 and engine.stats.waiting == 0, timeout)
