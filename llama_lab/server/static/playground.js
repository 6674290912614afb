// llama_lab playground: a streaming chat against /v1/chat/completions, with a Stop that aborts the fetch.
// Every string from the server or the user reaches the page through textContent, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SAVED = ["temperature", "top-p", "max-tokens", "seed", "system", "endpoint", "format", "schema"];
  const PREFIX = "llama_lab.playground.";

  const state = {
    messages: [],        // the conversation sent with each request
    controller: null,    // AbortController of the request in flight
    healthTimer: null,
    servedModels: [],
  };

  class ServerError extends Error {}

  // ------------------------------------------------------------------ settings kept between visits

  function restoreSettings() {
    for (const id of SAVED) {
      const value = localStorage.getItem(PREFIX + id);
      if (value !== null) $(id).value = value;
    }
    $("api-key").value = sessionStorage.getItem(PREFIX + "api-key") || "";  // a key stays in this tab only
    for (const id of SAVED) $(id).addEventListener("change", () => localStorage.setItem(PREFIX + id, $(id).value));
    $("api-key").addEventListener("change", () => sessionStorage.setItem(PREFIX + "api-key", $("api-key").value));
  }

  function endpoint() {
    const raw = $("endpoint").value.trim() || location.origin;
    return raw.replace(/\/+$/, "").replace(/\/v1$/, "");
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorMessage(resp) {
    const text = await resp.text();
    try {
      const data = JSON.parse(text);
      if (data && data.error && data.error.message) return `HTTP ${resp.status}: ${data.error.message}`;
    } catch (_) { /* not JSON: show it as is */ }
    return `HTTP ${resp.status}: ${text.slice(0, 500) || resp.statusText}`;
  }

  function unreachable(base, err) {
    const crossOrigin = base !== location.origin;
    return `Cannot reach ${base} (${err.message}). Is the server running at that address?` +
      (crossOrigin ? ` If it is, it may refuse this page's origin ${location.origin} in its CORS preflight: ` +
        `start it with --cors-origins ${location.origin}.` : "");
  }

  // ------------------------------------------------------------------ server info: /v1/models and /health

  function setServerState(kind, summary) {
    const dot = $("server-state");
    dot.className = "dot dot-" + kind;
    dot.title = kind;
    $("server-summary").textContent = summary;
  }

  async function loadModels() {
    const base = endpoint();
    setServerState("unknown", `connecting to ${base}…`);
    for (const id of ["mode", "device", "context", "load"]) $(id).textContent = "–";  // facts of the previous endpoint
    let data;
    try {
      const resp = await fetch(base + "/v1/models", { headers: headers(false) });
      if (!resp.ok) throw new ServerError(`${base}/v1/models answered ${await errorMessage(resp)}`);
      data = await resp.json();
    } catch (err) {
      if (base === endpoint()) setServerState("down", err instanceof ServerError ? err.message : unreachable(base, err));
      return;
    }
    if (base !== endpoint()) return;  // the endpoint changed meanwhile: that call's answer counts
    const select = $("model");
    const previous = select.value || localStorage.getItem(PREFIX + "model");
    state.servedModels = Array.isArray(data.data) ? data.data : [];
    select.replaceChildren(...state.servedModels.map((m) => new Option(String(m.id), String(m.id))));
    if (previous && state.servedModels.some((m) => m.id === previous)) select.value = previous;
    if (!state.servedModels.length) select.append(new Option("(no model: type none)", ""));
    showModelFacts();
    await pollHealth();
  }

  function showModelFacts() {
    const m = state.servedModels.find((x) => x.id === $("model").value) || {};
    $("context").textContent = m.context_length ? `${m.context_length} tokens` : "–";
    if (m.load_mode) $("mode").textContent = m.load_mode;
  }

  async function pollHealth() {
    const base = endpoint();
    try {
      const resp = await fetch(base + "/health", { headers: headers(false) });
      if (!resp.ok) throw new ServerError(`${base}/health answered ${await errorMessage(resp)}`);
      const h = await resp.json();
      if (base !== endpoint()) return;
      const model = $("model").value || h.model || "?";
      if (h.mode) $("mode").textContent = h.mode;
      $("device").textContent = h.device || "–";
      const busy = Number.isFinite(h.running) ? h.running + (h.waiting || 0) : null;
      $("load").textContent = busy === null ? "–" : `${h.running} / ${h.waiting}`;
      const where = h.mode ? `${h.mode} · ${h.device}` : `via ${base}`;
      const activity = busy === null ? "" : busy ? ` · generating (${h.running} running, ${h.waiting} waiting)` : " · idle";
      setServerState(busy ? "busy" : "up", `${model} · ${where}${activity}`);
    } catch (err) {
      if (base === endpoint()) setServerState("down", err instanceof ServerError ? err.message : unreachable(base, err));
    }
  }

  function startHealthPolling() {
    clearInterval(state.healthTimer);
    state.healthTimer = setInterval(() => { if (!document.hidden) pollHealth(); }, 2000);
  }

  // ------------------------------------------------------------------ the conversation

  function addBubble(role, text) {
    $("empty-hint").hidden = true;
    const bubble = document.createElement("div");
    bubble.className = "msg msg-" + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    bubble.append(who, body);
    $("messages").append(bubble);
    scrollDown();
    return bubble;
  }

  function scrollDown() {
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
  }

  function setBusy(busy) {
    document.body.dataset.state = busy ? "streaming" : "idle";
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  function showStats(s, final) {
    $("ttft").textContent = s.tFirst === null ? "–" : `${Math.round(s.tFirst - s.t0)} ms`;
    const tokens = final && s.usage ? s.usage.completion_tokens : s.chunks;
    $("ntokens").textContent = String(tokens);
    const span = s.tLast !== null && s.tFirst !== null ? (s.tLast - s.tFirst) / 1000 : 0;
    // decode speed: tokens after the first over the time since the first (TTFT is shown apart)
    $("tps").textContent = s.chunks > 1 && span > 0 ? ((s.chunks - 1) / span).toFixed(1) : "–";
  }

  function numberField(id, parse) {
    const raw = $(id).value.trim();
    if (raw === "") return undefined;
    const value = parse(raw);
    if (!Number.isFinite(value)) throw new ServerError(`${id.replace("-", "_")} must be a number (got ${raw})`);
    return value;
  }

  function requestBody() {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.messages);
    const body = { model: $("model").value || "default", messages, stream: true, stream_options: { include_usage: true } };
    const fields = { temperature: ["temperature", parseFloat], top_p: ["top-p", parseFloat],
      max_tokens: ["max-tokens", (v) => parseInt(v, 10)], seed: ["seed", (v) => parseInt(v, 10)] };
    for (const [name, [id, parse]] of Object.entries(fields)) {
      const value = numberField(id, parse);
      if (value !== undefined) body[name] = value;
    }
    const format = responseFormat();
    if (format) body.response_format = format;
    return body;
  }

  // JSON mode: the server constrains the answer with a grammar, so it always parses (or stops at max_tokens).
  function responseFormat() {
    const type = $("format").value;
    if (type === "json_object") return { type };
    if (type !== "json_schema") return null;
    let schema;
    try {
      schema = JSON.parse($("schema").value || "{}");
    } catch (err) {
      throw new ServerError(`the JSON schema is not valid JSON: ${err.message}`);
    }
    return { type, json_schema: { name: "playground", schema, strict: true } };
  }

  async function send(text) {
    if (state.controller) return;
    state.messages.push({ role: "user", content: text });
    addBubble("user", text);
    const bubble = addBubble("assistant", "");
    bubble.classList.add("streaming");
    const out = bubble.querySelector(".text");
    const s = { t0: performance.now(), tFirst: null, tLast: null, chunks: 0, usage: null };
    let answer = "";
    let finish = null;
    let outcome = "done";
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    showStats(s, false);
    $("finish").textContent = "…";
    try {
      const body = requestBody();
      const resp = await fetch(endpoint() + "/v1/chat/completions", {
        method: "POST", headers: { ...headers(true), Accept: "text/event-stream" },
        body: JSON.stringify(body), signal: controller.signal,
      });
      if (!resp.ok) throw new ServerError(await errorMessage(resp));
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]" || payload === "") continue;
          let chunk;
          try { chunk = JSON.parse(payload); } catch (_) { continue; }
          if (chunk.error) throw new ServerError(chunk.error.message || JSON.stringify(chunk.error));
          if (chunk.usage) s.usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const delta = choice.delta && choice.delta.content;
            if (delta) {
              const now = performance.now();
              if (s.tFirst === null) s.tFirst = now;
              s.tLast = now;
              s.chunks += 1;
              answer += delta;
              out.textContent = answer;
              showStats(s, false);
              scrollDown();
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    } catch (err) {
      if (controller.signal.aborted) {
        outcome = "stopped";
      } else {
        outcome = "error";
        const note = document.createElement("div");
        note.className = "error";
        note.textContent = err instanceof ServerError ? err.message : unreachable(endpoint(), err);
        bubble.append(note);
      }
    } finally {
      state.controller = null;
      bubble.classList.remove("streaming");
      bubble.dataset.outcome = outcome;
      if (answer) state.messages.push({ role: "assistant", content: answer });
      else if (outcome !== "done") state.messages.pop();  // nothing came back: let the user retry the same turn
      if (outcome === "done" && !answer) out.textContent = "(empty answer)";
      showStats(s, outcome === "done");
      $("finish").textContent = outcome === "stopped" ? "stopped by you" : outcome === "error" ? "error" : (finish || "–");
      setBusy(false);
      scrollDown();
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();  // closes the connection: the server drops the request
  }

  function clearChat() {
    stop();
    state.messages = [];
    $("messages").querySelectorAll(".msg").forEach((m) => m.remove());
    $("empty-hint").hidden = false;
    for (const id of ["ttft", "tps", "finish"]) $(id).textContent = "–";
    $("ntokens").textContent = "0";
  }

  // ------------------------------------------------------------------ wiring

  function init() {
    restoreSettings();
    setBusy(false);
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("prompt").value.trim();
      if (!text || state.controller) return;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (e) => {
      // isComposing: Enter that confirms an IME candidate (Chinese, Japanese) must not send
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("clear").addEventListener("click", clearChat);
    $("model").addEventListener("change", () => { localStorage.setItem(PREFIX + "model", $("model").value); showModelFacts(); });
    $("settings").addEventListener("submit", (e) => { e.preventDefault(); loadModels(); });
    $("endpoint").addEventListener("change", loadModels);
    $("api-key").addEventListener("change", loadModels);
    $("toggle-settings").addEventListener("click", () => {
      const open = document.body.classList.toggle("settings-open");
      $("toggle-settings").setAttribute("aria-expanded", String(open));
      $("toggle-settings").textContent = open ? "Chat" : "Settings";
    });
    loadModels();
    startHealthPolling();
  }

  init();
})();
