"""Notebook widgets: ``StopPanel``, the stop-button experiment with real buttons.

Start streams a long answer token by token; Stop closes the connection as NextChat's browser build
does; a live chart shows the CPU of the server process, and the server's own counter says how many
tokens it generated after Stop.
"""

from __future__ import annotations

import base64
import io
import logging
import threading

import httpx

from llama_lab.lab.stop_experiment import LONG_PROMPT, OURS_COUNTER, content_of, read_counter
from llama_lab.profiling import Monitor

logger = logging.getLogger(__name__)


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
                        text = content_of(line)
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
        self.chart.outputs = ({"output_type": "display_data", "metadata": {},
                               "data": {"image/png": base64.b64encode(buf.getvalue()).decode(),
                                        "text/plain": "<CPU chart>"}},)
