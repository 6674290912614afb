// llama_lab gateway console: channels, tokens, usage and the request log, over the admin REST API (/api).
// Every string that comes from the gateway or a user reaches the page through textContent or an
// attribute, never as HTML: channel names, model names and error messages are data, not markup.
"use strict";

(() => {
  const KEY_STORAGE = "llama_lab.gateway.admin_key";
  const MAX_LOG_ROWS = 10000;  // the API's limit per call; the overview says when a period has more
  const LOG_PAGE = 50;
  const PALETTE = ["#2f6fed", "#e8793a", "#1f9d55", "#9b51e0", "#d64545", "#0f9bb5", "#c98a00", "#e05297", "#5b8c00"];
  const OTHERS_COLOR = "#8a94a6";
  const BUCKETS = { 3600: 300, 86400: 3600, 604800: 6 * 3600, 2592000: 86400 };  // period -> bar width, seconds

  const $ = (id) => document.getElementById(id);
  const S = {
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    view: "overview",
    channels: [],
    tokens: [],
    tests: new Map(),      // channel id -> the last test result of this session (with its error text)
    periodRows: [],
    logs: [],
    logOffset: 0,
    hasOlder: false,
    shown: {},             // view -> JSON of the data last drawn: a quiet refresh redraws only on change
    timer: null,
  };

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // ------------------------------------------------------------------ DOM helpers (text only)

  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = String(v);
      else if (k === "dataset") for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = String(dv);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));  // a string becomes a text node
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  }

  function td(label, ...children) {
    // one wrapper per cell: on a phone the cell is a two-column grid (label, content)
    return h("td", { "data-label": label }, h("div", { class: "cell" }, ...children));
  }

  function emptyRow(table, text) {
    const cols = table.tHead.rows[0].cells.length;
    return h("tr", { class: "empty" }, h("td", { colspan: cols, text }));
  }

  const pad = (n) => String(n).padStart(2, "0");

  function fmtTime(ts) {
    const d = new Date(ts * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtDate(ts) {
    const d = new Date(ts * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }

  function fmtAgo(ts) {
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return "just now";
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }

  const fmtNum = (n) => Number(n).toLocaleString("en-US");
  const plural = (n, word) => `${fmtNum(n)} ${word}${n === 1 ? "" : "s"}`;

  function fmtShort(n) {
    if (n >= 1e9) return `${+(n / 1e9).toFixed(1)}G`;
    if (n >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
    if (n >= 1e3) return `${+(n / 1e3).toFixed(1)}k`;
    return String(Math.round(n));
  }

  const fmtMs = (ms) => (ms === null || ms === undefined ? "–" : ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`);

  function splitList(text) {
    return text.split(/[,\s]+/).map((x) => x.trim()).filter(Boolean);
  }

  function median(values) {
    if (!values.length) return null;
    const v = [...values].sort((a, b) => a - b);
    const mid = v.length >> 1;
    return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
  }

  function badge(text, kind) {
    return h("span", { class: `badge badge-${kind}`, text });
  }

  // ------------------------------------------------------------------ API

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + S.key };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      throw new ApiError(0, `The gateway did not answer (${err.message}). Is it still running?`);
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { /* shown as text below */ }
    if (!resp.ok) {
      const err = data && data.error;
      const message = (err && err.message) || `HTTP ${resp.status}: ${text.slice(0, 300)}`;
      if (resp.status === 401 && err && err.code === "invalid_admin_key") signOut(message);
      throw new ApiError(resp.status, message, err && err.code);
    }
    return data;
  }

  function showBanner(text, kind = "error") {
    const banner = $("banner");
    banner.className = `banner banner-${kind}`;
    $("banner-text").textContent = text;
    banner.hidden = false;
    clearTimeout(showBanner.timer);
    if (kind === "ok") showBanner.timer = setTimeout(() => { banner.hidden = true; }, 4000);
  }

  async function guarded(fn) {
    try {
      return await fn();
    } catch (err) {
      if (!(err instanceof ApiError && err.code === "invalid_admin_key")) showBanner(err.message);
      return undefined;
    }
  }

  // ------------------------------------------------------------------ sign in / out

  async function signIn(key) {
    S.key = key;
    try {
      S.channels = await api("GET", "/api/channels");
    } catch (err) {
      signOut(err.message);
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("login").hidden = true;
    $("app").hidden = false;
    S.shown = {};
    clearInterval(S.timer);
    S.timer = setInterval(tick, 10000);
    await route();
  }

  function signOut(message) {
    S.key = "";
    sessionStorage.removeItem(KEY_STORAGE);
    clearInterval(S.timer);
    $("app").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("admin-key").value = "";
    $("admin-key").focus();
  }

  // ------------------------------------------------------------------ views

  const VIEWS = {
    overview: { load: loadOverview, render: renderOverview },
    channels: { load: loadChannels, render: renderChannels },
    tokens: { load: loadTokens, render: renderTokens },
    logs: { load: loadLogs, render: renderLogs },
  };

  async function route() {
    const name = location.hash.replace(/^#/, "");
    S.view = name in VIEWS ? name : "overview";
    for (const link of document.querySelectorAll(".tabs a")) {
      if (link.dataset.view === S.view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    for (const view of Object.keys(VIEWS)) $("view-" + view).hidden = view !== S.view;
    $("banner").hidden = true;  // a message belongs to the view it was shown in
    await refresh(false);
  }

  async function refresh(quiet) {
    const view = S.view;
    await guarded(async () => {
      const data = await VIEWS[view].load();
      const signature = JSON.stringify(data);
      if (!(quiet && S.shown[view] === signature)) {
        S.shown[view] = signature;
        VIEWS[view].render();
      }
      $("updated").textContent = `updated ${fmtTime(Date.now() / 1000).slice(11)}`;
    });
  }

  function tick() {
    if (document.hidden || $("app").hidden || document.querySelector("dialog[open]")) return;
    if (S.view === "logs" && !$("auto-refresh").checked) return;
    refresh(true);
  }

  async function loadChannelsAndTokens() {
    [S.channels, S.tokens] = await Promise.all([api("GET", "/api/channels"), api("GET", "/api/tokens")]);
    updateKnownModels();
  }

  function knownModels() {
    const names = new Set();
    for (const c of S.channels) for (const m of [...c.models, ...Object.keys(c.model_mapping || {})]) names.add(m);
    return [...names].sort();
  }

  function updateKnownModels() {
    $("known-models").replaceChildren(...knownModels().map((m) => h("option", { value: m })));
  }

  // ------------------------------------------------------------------ channels

  async function loadChannels() {
    S.channels = await api("GET", "/api/channels");
    updateKnownModels();
    return [S.channels];
  }

  const isActive = (c) => c.enabled && !c.auto_disabled;
  const channelModels = (c) => [...c.models, ...Object.keys(c.model_mapping || {})];

  function competes(a, b) {
    const am = channelModels(a);
    const bm = channelModels(b);
    return !am.length || !bm.length || am.some((m) => bm.includes(m));
  }

  /** What share of its traffic a channel gets, as the router computes it (priority, then weight). */
  function shareText(c) {
    if (!isActive(c)) return "gets no traffic";
    const rivals = S.channels.filter((o) => isActive(o) && competes(o, c));
    const top = Math.max(...rivals.map((o) => o.priority));
    if (c.priority < top) return `fallback: priority ${top} goes first`;
    const peers = rivals.filter((o) => o.priority === c.priority);
    const total = peers.reduce((sum, o) => sum + o.weight, 0);
    if (c.weight === 0) return total === 0 ? "spare (every peer is a spare)" : "spare: used when the others fail";
    if (peers.length === 1) return "all of its traffic";
    return `${Math.round((100 * c.weight) / total)}% of the traffic it shares`;
  }

  function channelState(c) {
    if (!c.enabled) return badge("disabled", "off");
    if (c.auto_disabled) return badge("auto-disabled", "bad");
    return badge("enabled", "ok");
  }

  function lastTest(c) {
    const test = S.tests.get(c.id);
    if (test) {
      return h("div", { class: "test-result", dataset: { ok: test.ok } },
        test.ok ? badge(`✓ ${fmtMs(test.latency_ms)}`, "ok") : badge("✗ failed", "bad"),
        test.model ? h("span", { class: "muted small", text: ` ${test.model}` }) : null,
        test.ok ? null : h("div", { class: "small error-text clamp", title: test.error || "", text: test.error || `HTTP ${test.status_code}`,
          onclick: (e) => e.currentTarget.classList.toggle("clamp") }));
    }
    if (!c.last_test_at) return h("span", { class: "muted", text: "never" });
    return h("div", {},
      c.last_test_latency_ms === null ? badge("✗ failed", "bad") : badge(`✓ ${fmtMs(c.last_test_latency_ms)}`, "ok"),
      h("div", { class: "muted small", text: fmtAgo(c.last_test_at), title: fmtTime(c.last_test_at) }));
  }

  function modelChips(c) {
    const chips = c.models.map((m) => h("span", { class: "chip", text: m, title: m }));
    for (const [from, to] of Object.entries(c.model_mapping || {})) {
      chips.push(h("span", { class: "chip", text: `${from} → ${to}`, title: `requests for ${from} go upstream as ${to}` }));
    }
    return chips.length ? h("div", { class: "chips" }, chips) : h("span", { class: "muted", text: "any model" });
  }

  function renderChannels() {
    const table = $("channels-table");
    const rows = S.channels.map((c) => h("tr", { dataset: { id: c.id } },
      td("Channel", h("div", { class: "name", text: c.name }), h("div", { class: "muted small mono", text: c.base_url }),
        c.has_api_key ? h("div", { class: "muted small", text: "sends an API key" }) : null),
      td("Models", modelChips(c)),
      td("Priority", String(c.priority)),
      td("Weight", h("div", { text: String(c.weight) }), h("div", { class: "muted small share", text: shareText(c) })),
      td("State", channelState(c), c.disabled_reason ? h("div", { class: "small error-text", text: c.disabled_reason }) : null),
      td("Last test", lastTest(c)),
      td("Actions", h("div", { class: "actions" },
        h("button", { type: "button", class: "small", onclick: (e) => testChannel(c, e.currentTarget) }, "Test"),
        h("button", { type: "button", class: "small", onclick: () => setChannelEnabled(c, !isActive(c)) },
          c.enabled && !c.auto_disabled ? "Disable" : c.enabled ? "Re-enable" : "Enable"),
        h("button", { type: "button", class: "small", onclick: () => openChannelForm(c) }, "Edit"),
        h("button", { type: "button", class: "small danger-text", onclick: () => deleteChannel(c) }, "Delete")))));
    table.tBodies[0].replaceChildren(...(rows.length ? rows
      : [emptyRow(table, "No channels yet: add the backends (llama-lab serve, vLLM, another gateway) this gateway should use.")]));
  }

  async function testChannel(c, button) {
    if (button) { button.disabled = true; button.textContent = "Testing…"; }
    await guarded(async () => {
      const result = await api("POST", `/api/channels/${c.id}/test`);
      S.tests.set(c.id, result);
      await loadChannels();
      if (S.view === "channels") renderChannels();
      if (result.ok) showBanner(`Channel '${c.name}' answered in ${fmtMs(result.latency_ms)}.`, "ok");
      else showBanner(`Channel '${c.name}' failed its test: ${result.error || "HTTP " + result.status_code}`);
    });
    if (button && button.isConnected) { button.disabled = false; button.textContent = "Test"; }
  }

  async function setChannelEnabled(c, enabled) {
    await guarded(async () => {
      await api("PATCH", `/api/channels/${c.id}`, { enabled });
      await refresh(false);
    });
  }

  async function deleteChannel(c) {
    if (!confirm(`Delete channel '${c.name}'? Requests stop going to ${c.base_url} at once.`)) return;
    await guarded(async () => {
      await api("DELETE", `/api/channels/${c.id}`);
      S.tests.delete(c.id);
      showBanner(`Channel '${c.name}' deleted.`, "ok");
      await refresh(false);
    });
  }

  let editingChannel = null;

  function openChannelForm(c) {
    editingChannel = c || null;
    const form = $("channel-form");
    form.reset();
    form.classList.toggle("editing", !!c);
    $("channel-form-title").textContent = c ? `Edit channel '${c.name}'` : "Add channel";
    form.querySelector(".form-error").textContent = "";
    if (c) {
      form.elements.name.value = c.name;
      form.elements.base_url.value = c.base_url;
      form.elements.api_key.placeholder = c.has_api_key ? "unchanged" : "none";
      form.elements.models.value = c.models.join(", ");
      form.elements.model_mapping.value = Object.entries(c.model_mapping || {}).map(([a, b]) => `${a}=${b}`).join("\n");
      form.elements.priority.value = c.priority;
      form.elements.weight.value = c.weight;
      form.elements.enabled.checked = c.enabled;
    } else {
      form.elements.api_key.placeholder = "none";
    }
    $("channel-dialog").showModal();
    form.elements.name.focus();
  }

  function readChannelForm(form) {
    const f = form.elements;
    const mapping = {};
    for (const line of f.model_mapping.value.split("\n")) {
      if (!line.trim()) continue;
      const [from, ...rest] = line.split("=");
      if (!rest.length || !from.trim() || !rest.join("=").trim()) throw new Error(`model mapping line '${line.trim()}' is not requested=upstream`);
      mapping[from.trim()] = rest.join("=").trim();
    }
    const baseUrl = f.base_url.value.trim();
    if (!/^https?:\/\//.test(baseUrl)) throw new Error(`the base URL must start with http:// or https:// (got '${baseUrl}')`);
    const body = {
      name: f.name.value.trim(), base_url: baseUrl, models: splitList(f.models.value), model_mapping: mapping,
      priority: parseInt(f.priority.value || "0", 10), weight: parseInt(f.weight.value || "0", 10), enabled: f.enabled.checked,
    };
    if (!Number.isInteger(body.priority)) throw new Error("priority must be a whole number");
    if (!Number.isInteger(body.weight) || body.weight < 0) throw new Error("weight must be a whole number, 0 or more");
    if (f.api_key.value) body.api_key = f.api_key.value;
    else if (editingChannel && f.clear_key.checked) body.api_key = null;
    return body;
  }

  async function saveChannel(e) {
    e.preventDefault();
    const form = $("channel-form");
    const error = form.querySelector(".form-error");
    let body;
    try { body = readChannelForm(form); } catch (err) { error.textContent = err.message; return; }
    try {
      const saved = editingChannel
        ? await api("PATCH", `/api/channels/${editingChannel.id}`, body)
        : await api("POST", "/api/channels", body);
      $("channel-dialog").close();
      showBanner(`Channel '${saved.name}' saved.`, "ok");
      await refresh(false);
      if (!editingChannel && form.elements.test_after.checked) await testChannel(saved, null);
    } catch (err) {
      error.textContent = err.message;
    }
  }

  // ------------------------------------------------------------------ tokens

  async function loadTokens() {
    await loadChannelsAndTokens();
    return [S.tokens, knownModels()];
  }

  function tokenState(t) {
    if (!t.enabled) return ["revoked", "off"];
    if (t.expires_at !== null && t.expires_at <= Date.now() / 1000) return ["expired", "bad"];
    if (t.quota !== null && t.used >= t.quota) return ["quota used up", "bad"];
    return ["active", "ok"];
  }

  function limitsLine(t) {
    const parts = [];
    if (t.budget_period !== null) parts.push(`${t.budget_period} quota, resets ${fmtTime(t.next_reset_at)}`);
    if (t.lifetime_cap !== null) parts.push(`${fmtNum(t.used_total)} of ${fmtNum(t.lifetime_cap)} over all periods`);
    if (t.rpm_limit !== null) parts.push(`≤ ${fmtNum(t.rpm_limit)} requests/min`);
    if (t.tpm_limit !== null) parts.push(`≤ ${fmtNum(t.tpm_limit)} tokens/min`);
    for (const [model, l] of Object.entries(t.model_limits || {})) {
      const own = [l.rpm !== null ? `${fmtNum(l.rpm)} requests/min` : null, l.tpm !== null ? `${fmtNum(l.tpm)} tokens/min` : null];
      parts.push(`${model}: ≤ ${own.filter(Boolean).join(", ")}`);
    }
    if (t.max_parallel !== null) parts.push(`${fmtNum(t.in_flight)} of ${fmtNum(t.max_parallel)} in flight`);
    else if (t.in_flight > 0) parts.push(`${fmtNum(t.in_flight)} in flight`);
    return parts.length ? h("div", { class: "muted small limits", text: parts.join(" · ") }) : null;
  }

  function usageCell(t) {
    const used = h("div", { class: "usage-text" }, h("b", { text: fmtNum(t.used) }),
      t.quota === null ? " used · unlimited" : ` of ${fmtNum(t.quota)}`);
    if (t.quota === null) return [used, limitsLine(t)];
    const share = t.quota > 0 ? Math.min(1, t.used / t.quota) : 1;
    const fill = h("div", { class: "bar-fill" + (share >= 1 ? " full" : share > 0.8 ? " high" : "") });
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    return [used, h("div", { class: "bar", title: `${(share * 100).toFixed(1)}% of the quota` }, fill), limitsLine(t)];
  }

  function renderTokens() {
    const table = $("tokens-table");
    const rows = S.tokens.map((t) => {
      const [state, kind] = tokenState(t);
      return h("tr", { dataset: { id: t.id } },
        td("Token", h("div", { class: "name", text: t.name }), h("div", { class: "muted small mono", text: t.key_hint }),
          t.subnets.length ? h("div", { class: "muted small", text: `from ${t.subnets.join(", ")}` }) : null),
        td("Usage", usageCell(t)),
        td("Models", t.models.length ? h("div", { class: "chips" }, t.models.map((m) => h("span", { class: "chip", text: m, title: m })))
          : h("span", { class: "muted", text: "every model" })),
        td("Expires", t.expires_at === null ? h("span", { class: "muted", text: "never" })
          : h("span", { text: fmtDate(t.expires_at), title: fmtTime(t.expires_at) })),
        td("State", badge(state, kind)),
        td("Actions", h("div", { class: "actions" },
          h("button", { type: "button", class: "small", onclick: () => openTokenForm(t) }, "Edit"),
          t.enabled
            ? h("button", { type: "button", class: "small danger-text", onclick: () => setTokenEnabled(t, false) }, "Revoke")
            : h("button", { type: "button", class: "small", onclick: () => setTokenEnabled(t, true) }, "Enable"),
          t.used > 0 ? h("button", { type: "button", class: "small", onclick: () => resetUsage(t) }, "Reset usage") : null,
          h("button", { type: "button", class: "small danger-text", onclick: () => deleteToken(t) }, "Delete"))));
    });
    table.tBodies[0].replaceChildren(...(rows.length ? rows : [emptyRow(table, "No tokens yet: create one per person or app.")]));
  }

  async function setTokenEnabled(t, enabled) {
    if (!enabled && !confirm(`Revoke token '${t.name}'? Requests with its key are refused at once, until you enable it again.`)) return;
    await guarded(async () => {
      await api("PATCH", `/api/tokens/${t.id}`, { enabled });
      showBanner(enabled ? `Token '${t.name}' enabled.` : `Token '${t.name}' revoked: its key is refused now.`, "ok");
      await refresh(false);
    });
  }

  async function resetUsage(t) {
    if (!confirm(`Reset the usage of '${t.name}' to 0? The request log keeps its history.`)) return;
    await guarded(async () => {
      await api("PATCH", `/api/tokens/${t.id}`, { used: 0 });
      await refresh(false);
    });
  }

  async function deleteToken(t) {
    if (!confirm(`Delete token '${t.name}' for good? Its key stops working; the log keeps its requests.`)) return;
    await guarded(async () => {
      await api("DELETE", `/api/tokens/${t.id}`);
      showBanner(`Token '${t.name}' deleted.`, "ok");
      await refresh(false);
    });
  }

  let editingToken = null;

  function openTokenForm(t) {
    editingToken = t || null;
    const form = $("token-form");
    form.reset();
    form.classList.toggle("editing", !!t);
    $("token-form-title").textContent = t ? `Edit token '${t.name}'` : "Create token";
    form.querySelector(".form-error").textContent = "";
    const f = form.elements;
    const keep = f.expires.querySelector("option[value=keep]");
    keep.hidden = keep.disabled = !t;  // "unchanged" only makes sense for an existing token
    f.expires.value = t ? "keep" : "30";
    if (t) {
      f.name.value = t.name;
      f.quota.value = t.quota === null ? "" : t.quota;
      f.budget_period.value = t.budget_period === null ? "" : t.budget_period;
      f.lifetime_cap.value = t.lifetime_cap === null ? "" : t.lifetime_cap;
      f.rpm_limit.value = t.rpm_limit === null ? "" : t.rpm_limit;
      f.max_parallel.value = t.max_parallel === null ? "" : t.max_parallel;
      f.tpm_limit.value = t.tpm_limit === null ? "" : t.tpm_limit;
      f.model_limits.value = Object.entries(t.model_limits || {}).map(([model, l]) =>
        `${model}=` + [["rpm", l.rpm], ["tpm", l.tpm]].filter(([, n]) => n !== null).map(([k, n]) => `${k}:${n}`).join(",")).join("\n");
      f.models.value = t.models.join(", ");
      f.subnets.value = t.subnets.join(", ");
      f.enabled.checked = t.enabled;
    }
    showExpiryDate();
    const picks = form.querySelector(".model-picks");
    picks.replaceChildren(...knownModels().map((m) => h("button", {
      type: "button", class: "chip chip-button", title: "add to the allowed models",
      onclick: () => {
        const current = splitList(f.models.value);
        if (!current.includes(m)) f.models.value = [...current, m].join(", ");
      },
    }, `+ ${m}`)));
    $("token-dialog").showModal();
    f.name.focus();
  }

  function showExpiryDate() {
    $("token-form").querySelector(".expires-date").hidden = $("token-form").elements.expires.value !== "date";
  }

  function readTokenForm(form) {
    const f = form.elements;
    const body = { name: f.name.value.trim(), models: splitList(f.models.value), subnets: splitList(f.subnets.value), enabled: f.enabled.checked };
    const quota = f.quota.value.trim();
    body.quota = quota === "" ? null : Number(quota);
    if (body.quota !== null && !(Number.isInteger(body.quota) && body.quota >= 0)) throw new Error("the quota must be a whole number of tokens, or empty for unlimited");
    body.budget_period = f.budget_period.value === "" ? null : f.budget_period.value;
    const cap = f.lifetime_cap.value.trim();
    body.lifetime_cap = cap === "" ? null : Number(cap);
    if (body.lifetime_cap !== null && !(Number.isInteger(body.lifetime_cap) && body.lifetime_cap >= 0)) throw new Error("the lifetime cap must be a whole number of tokens, or empty for no cap");
    body.model_limits = readModelLimits(f.model_limits.value);
    for (const [field, what] of [["rpm_limit", "requests per minute"], ["tpm_limit", "tokens per minute"], ["max_parallel", "requests in flight"]]) {
      const value = f[field].value.trim();
      body[field] = value === "" ? null : Number(value);
      if (body[field] !== null && !(Number.isInteger(body[field]) && body[field] >= 1)) throw new Error(`the ${what} must be a whole number from 1, or empty for no limit`);
    }
    const expires = f.expires.value;
    if (expires === "never") body.expires_at = null;
    else if (expires === "date") {
      const when = Date.parse(f.expires_date.value);
      if (!Number.isFinite(when)) throw new Error("pick an expiry date");
      body.expires_at = when / 1000;
    } else if (expires !== "keep") body.expires_at = Date.now() / 1000 + Number(expires) * 86400;
    return body;
  }

  // "model=rpm:N,tpm:M" per line (what --model-limit takes) -> {model: {rpm, tpm}}; no line -> null
  function readModelLimits(text) {
    const limits = {};
    for (const line of text.split("\n")) {
      if (!line.trim()) continue;
      const at = line.lastIndexOf("=");  // the last: a model name may hold ":" or "/"
      const model = line.slice(0, at).trim();
      const parts = line.slice(at + 1).split(",").map((p) => p.split(":").map((x) => x.trim()));
      const ok = at > 0 && model && parts.every(([kind, n]) => (kind === "rpm" || kind === "tpm") && /^[1-9][0-9]*$/.test(n || ""));
      if (!ok) throw new Error(`limits line '${line.trim()}' is not model=rpm:N,tpm:M (whole numbers from 1)`);
      limits[model] = Object.fromEntries(parts.map(([kind, n]) => [kind, Number(n)]));
    }
    return Object.keys(limits).length ? limits : null;
  }

  async function saveToken(e) {
    e.preventDefault();
    const form = $("token-form");
    const error = form.querySelector(".form-error");
    let body;
    try { body = readTokenForm(form); } catch (err) { error.textContent = err.message; return; }
    try {
      if (editingToken) {
        const saved = await api("PATCH", `/api/tokens/${editingToken.id}`, body);
        $("token-dialog").close();
        showBanner(`Token '${saved.name}' saved.`, "ok");
      } else {
        const created = await api("POST", "/api/tokens", body);
        $("token-dialog").close();
        showKey(created);
      }
      await refresh(false);
    } catch (err) {
      error.textContent = err.message;
    }
  }

  function showKey(created) {
    const origin = location.origin;
    $("key-name").textContent = `'${created.name}'`;
    $("new-key").value = created.key;
    $("key-base-url").textContent = `${origin}/v1`;
    $("key-nextchat").textContent = `${origin} (no /v1)`;
    const model = created.models[0] || knownModels()[0] || "MODEL";
    $("key-curl").textContent = `curl ${origin}/v1/chat/completions \\\n  -H "Authorization: Bearer ${created.key}" \\\n` +
      `  -H "Content-Type: application/json" \\\n  -d '{"model": ${JSON.stringify(model)}, "messages": [{"role": "user", "content": "hi"}]}'`;
    $("key-dialog").showModal();
    $("new-key").select();
  }

  async function copyKey() {
    const input = $("new-key");
    try {
      await navigator.clipboard.writeText(input.value);
    } catch (_) {  // no clipboard API on plain http from another host: fall back to the selection
      input.select();
      document.execCommand("copy");
    }
    $("copy-key").textContent = "Copied";
  }

  function closeKeyDialog() {
    $("new-key").value = "";  // the key leaves the page with the dialog
    $("key-curl").textContent = "";
    $("copy-key").textContent = "Copy";
    $("key-dialog").close();
  }

  // ------------------------------------------------------------------ request log

  function logFilters() {
    const params = new URLSearchParams();
    if ($("f-token").value) params.set("token_id", $("f-token").value);
    if ($("f-channel").value) params.set("channel_id", $("f-channel").value);
    if ($("f-model").value.trim()) params.set("model", $("f-model").value.trim());
    if ($("f-status").value) params.set("status", $("f-status").value);
    return params;
  }

  function fillSelect(select, items, anyText) {
    const current = select.value;
    select.replaceChildren(new Option(anyText, ""), ...items.map((it) => new Option(it.name, String(it.id))));
    if ([...select.options].some((o) => o.value === current)) select.value = current;
  }

  async function loadLogs() {
    await loadChannelsAndTokens();
    fillSelect($("f-token"), S.tokens, "any token");
    fillSelect($("f-channel"), S.channels, "any channel");
    const params = logFilters();
    params.set("limit", String(LOG_PAGE + 1));  // one more: is there an older page?
    params.set("offset", String(S.logOffset));
    const rows = await api("GET", "/api/logs?" + params);
    S.hasOlder = rows.length > LOG_PAGE;
    S.logs = rows.slice(0, LOG_PAGE);
    return [S.logs, S.logOffset];
  }

  function statusBadge(status) {
    const kind = status < 300 ? "ok" : status === 499 ? "off" : status < 500 ? "warn" : "bad";
    return badge(String(status), kind);
  }

  function renderLogs() {
    const table = $("logs-table");
    const rows = S.logs.map((r) => h("tr", { dataset: { id: r.id, status: r.status } },
      td("Time", h("span", { class: "mono small", text: fmtTime(r.time) })),
      td("Token", r.token_name === null ? h("span", { class: "muted", text: "–" }) : r.token_name),
      td("Channel", r.channel_name === null ? h("span", { class: "muted", text: "–" }) : r.channel_name),
      td("Model", r.model === null ? h("span", { class: "muted", text: "–" }) : r.model),
      td("Tokens", h("span", { text: fmtNum(r.total_tokens), title: `prompt ${r.prompt_tokens} + completion ${r.completion_tokens}` }),
        h("span", { class: "muted small", text: ` (${r.prompt_tokens}+${r.completion_tokens})` })),
      td("Latency", fmtMs(r.latency_ms), r.first_byte_ms === null ? null : h("span", { class: "muted small", text: ` · first byte ${fmtMs(r.first_byte_ms)}` }),
        r.stream ? h("span", { class: "muted small", text: " · stream" }) : null),
      td("Status", statusBadge(r.status)),
      td("Error", r.error ? h("span", { class: "error-text clamp", title: r.error, text: r.error,
        onclick: (e) => e.currentTarget.classList.toggle("clamp") }) : h("span", { class: "muted", text: "–" }))));
    const filtered = [...logFilters().keys()].length > 0;
    table.tBodies[0].replaceChildren(...(rows.length ? rows
      : [emptyRow(table, filtered ? "No requests match these filters." : "No requests yet.")]));
    $("newer").disabled = S.logOffset === 0;
    $("older").disabled = !S.hasOlder;
    $("page-info").textContent = rows.length ? `requests ${S.logOffset + 1}–${S.logOffset + rows.length}, newest first` : "";
  }

  function csvCell(value) {
    let text = value === null || value === undefined ? "" : String(value);
    if (/^[=+\-@]/.test(text)) text = "'" + text;  // a spreadsheet must not run a cell as a formula
    return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  async function exportCsv() {
    await guarded(async () => {
      const params = logFilters();
      params.set("limit", String(MAX_LOG_ROWS));
      const rows = await api("GET", "/api/logs?" + params);
      const cols = ["id", "time", "token_name", "channel_name", "model", "prompt_tokens", "completion_tokens", "total_tokens",
        "latency_ms", "first_byte_ms", "status", "stream", "error"];
      const lines = [cols.join(",")].concat(rows.map((r) => cols.map((c) => csvCell(c === "time" ? fmtTime(r.time) : r[c])).join(",")));
      const url = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
      const link = h("a", { href: url, download: "gateway-log.csv" });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    });
  }

  // ------------------------------------------------------------------ overview: cards, charts, health

  async function loadOverview() {
    const period = Number($("period").value);
    const since = Date.now() / 1000 - period;
    const [, rows] = await Promise.all([loadChannelsAndTokens(), api("GET", `/api/logs?since=${since}&limit=${MAX_LOG_ROWS}`)]);
    S.periodRows = rows;
    return [S.channels, S.tokens, rows.map((r) => r.id), period];
  }

  function card(label, value, detail, id) {
    return h("div", { class: "stat", dataset: { stat: id } },
      h("div", { class: "stat-label", text: label }), h("div", { class: "stat-value", text: value }),
      detail ? h("div", { class: "muted small", text: detail }) : null);
  }

  function renderOverview() {
    const rows = S.periodRows;
    const ok = rows.filter((r) => r.status === 200);
    const errors = rows.filter((r) => r.status >= 400 && r.status !== 499);
    const tokensUsed = rows.reduce((sum, r) => sum + r.total_tokens, 0);
    const activeChannels = S.channels.filter(isActive).length;
    const activeTokens = S.tokens.filter((t) => tokenState(t)[1] === "ok").length;
    $("cards").replaceChildren(
      card("Requests", fmtNum(rows.length), `${fmtNum(ok.length)} ok`, "requests"),
      card("Tokens used", fmtNum(tokensUsed), "prompt + completion", "tokens"),
      card("Errors", fmtNum(errors.length), rows.length ? `${((100 * errors.length) / rows.length).toFixed(1)}% of requests` : "", "errors"),
      card("Median latency", fmtMs(median(ok.map((r) => r.latency_ms))), "successful requests", "latency"),
      card("Channels", `${activeChannels} / ${S.channels.length}`, "serving", "channels"),
      card("Tokens", `${activeTokens} / ${S.tokens.length}`, "usable", "keys"));
    drawUsage("token");
    drawUsage("channel");
    renderHealth();
    $("usage-note").textContent = rows.length >= MAX_LOG_ROWS
      ? `This period has more than ${fmtNum(MAX_LOG_ROWS)} requests: the figures cover the newest ${fmtNum(MAX_LOG_ROWS)}.` : "";
  }

  function renderHealth() {
    const table = $("health-table");
    const rows = S.channels.map((c) => {
      const mine = S.periodRows.filter((r) => r.channel_id === c.id);
      const good = mine.filter((r) => r.status === 200);
      const lastError = mine.find((r) => r.error);
      return h("tr", { dataset: { id: c.id } },
        td("Channel", h("div", { class: "name", text: c.name })),
        td("State", channelState(c), c.disabled_reason ? h("div", { class: "small error-text", text: c.disabled_reason }) : null),
        td("Last test", lastTest(c)),
        td("Requests", fmtNum(mine.length)),
        td("Success", mine.length ? `${((100 * good.length) / mine.length).toFixed(0)}%` : "–"),
        td("Median latency", fmtMs(median(good.map((r) => r.latency_ms)))),
        td("Last error", lastError ? h("span", { class: "error-text clamp", title: lastError.error, text: lastError.error }) : h("span", { class: "muted", text: "–" })));
    });
    table.tBodies[0].replaceChildren(...(rows.length ? rows : [emptyRow(table, "No channels yet.")]));
  }

  /** A round tick step (1, 2 or 5 times a power of ten, at least 1) that covers ``v`` in about four steps. */
  function niceStep(v) {
    const raw = Math.max(1, v / 4);
    const p = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
    return 10 * p;
  }

  /** Stacked bars of tokens per time bucket, one colour per token (or channel), drawn as plain SVG. */
  function drawUsage(group) {
    const box = $("chart-" + group);
    const legend = $("legend-" + group);
    const period = Number($("period").value);
    const step = BUCKETS[period] || period / 24;
    const now = Date.now() / 1000;
    const end = Math.ceil(now / step) * step;
    const n = Math.ceil(period / step);
    const start = end - n * step;

    const idKey = group === "token" ? "token_id" : "channel_id";
    const nameKey = group === "token" ? "token_name" : "channel_name";
    const nobody = group === "token" ? "(no valid token)" : "(refused before routing)";
    const series = new Map();
    for (const r of S.periodRows) {
      const key = r[idKey] === null ? "none" : String(r[idKey]);
      let s = series.get(key);
      if (!s) { s = { key, label: r[idKey] === null ? nobody : (r[nameKey] || `#${r[idKey]}`), total: 0, requests: 0, buckets: new Array(n).fill(0) }; series.set(key, s); }
      s.total += r.total_tokens;
      s.requests += 1;
      const b = Math.floor((r.time - start) / step);
      if (b >= 0 && b < n) s.buckets[b] += r.total_tokens;
    }
    let list = [...series.values()].sort((a, b) => b.total - a.total || b.requests - a.requests);
    if (list.length > PALETTE.length) {  // the smallest series share one colour
      const rest = list.slice(PALETTE.length - 1);
      const others = { key: "others", label: `${rest.length} others`, total: 0, requests: 0, buckets: new Array(n).fill(0) };
      for (const s of rest) { others.total += s.total; others.requests += s.requests; s.buckets.forEach((v, i) => { others.buckets[i] += v; }); }
      list = [...list.slice(0, PALETTE.length - 1), others];
    }
    list.forEach((s, i) => { s.color = s.key === "others" ? OTHERS_COLOR : PALETTE[i]; });

    const W = Math.max(260, Math.floor(box.clientWidth || 600));
    const H = 210;
    const m = { l: 44, r: 8, t: 10, b: 24 };
    const pw = W - m.l - m.r;
    const ph = H - m.t - m.b;
    const sums = new Array(n).fill(0);
    for (const s of list) s.buckets.forEach((v, i) => { sums[i] += v; });
    const tick = niceStep(Math.max(0, ...sums));
    const ticks = Math.max(1, Math.ceil(Math.max(0, ...sums) / tick));
    const top = tick * ticks;
    const chart = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `tokens used by ${group}` });
    for (let i = 0; i <= ticks; i++) {
      const y = m.t + ph - (ph * i) / ticks;
      chart.append(svg("line", { x1: m.l, x2: W - m.r, y1: y, y2: y, class: i ? "grid" : "axis" }));
      chart.append(svg("text", { x: m.l - 6, y: y + 4, "text-anchor": "end", class: "tick" }, fmtShort(tick * i)));
    }
    const bw = pw / n;
    const every = Math.max(1, Math.ceil(64 / bw));
    for (let b = 0; b < n; b++) {
      let y = m.t + ph;
      const t0 = start + b * step;
      for (const s of list) {
        const v = s.buckets[b];
        if (!v) continue;
        const hgt = Math.max(1, (ph * v) / top);
        y -= hgt;
        const rect = svg("rect", { x: (m.l + b * bw + Math.min(1, bw * 0.1)).toFixed(2), y: y.toFixed(2),
          width: Math.max(1, bw - 2 * Math.min(1, bw * 0.1)).toFixed(2), height: hgt.toFixed(2), fill: s.color,
          "data-series": s.label, "data-value": v });
        rect.append(svg("title", {}, `${s.label} · ${bucketLabel(t0, step)} · ${fmtNum(v)} tokens`));
        chart.append(rect);
      }
      if (b % every === 0) {
        chart.append(svg("text", { x: (m.l + b * bw).toFixed(2), y: H - 6, class: "tick" }, axisLabel(t0, step)));
      }
    }
    if (!list.some((s) => s.total > 0)) {
      chart.append(svg("text", { x: m.l + pw / 2, y: m.t + ph / 2, "text-anchor": "middle", class: "empty-chart" }, "no tokens used in this period"));
    }
    box.replaceChildren(chart);
    legend.replaceChildren(...list.map((s) => {
      const swatch = h("span", { class: "swatch" });
      swatch.style.background = s.color;
      return h("li", { dataset: { series: s.label, total: s.total, requests: s.requests } },
        swatch, h("span", { class: "legend-name", text: s.label }),
        h("span", { class: "muted", text: ` ${plural(s.total, "token")} · ${plural(s.requests, "request")}` }));
    }));
  }

  function axisLabel(ts, step) {
    const d = new Date(ts * 1000);
    return step < 86400 && !(step >= 6 * 3600 && d.getHours() === 0)
      ? (step >= 6 * 3600 ? `${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}h` : `${pad(d.getHours())}:${pad(d.getMinutes())}`)
      : `${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  }

  function bucketLabel(ts, step) {
    return `${fmtDate(ts)} – ${fmtDate(ts + step).slice(11)}`;
  }

  // ------------------------------------------------------------------ wiring

  function init() {
    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("admin-key").value.trim();
      if (key) signIn(key);
    });
    $("sign-out").addEventListener("click", () => signOut("Signed out."));
    $("refresh").addEventListener("click", () => refresh(false));
    $("banner-close").addEventListener("click", () => { $("banner").hidden = true; });
    window.addEventListener("hashchange", route);
    $("period").addEventListener("change", () => refresh(false));
    $("add-channel").addEventListener("click", () => openChannelForm(null));
    $("add-token").addEventListener("click", () => openTokenForm(null));
    $("channel-form").addEventListener("submit", saveChannel);
    $("token-form").addEventListener("submit", saveToken);
    $("token-form").elements.expires.addEventListener("change", showExpiryDate);
    for (const button of document.querySelectorAll("[data-close]")) {
      button.addEventListener("click", () => button.closest("dialog").close());
    }
    $("copy-key").addEventListener("click", copyKey);
    $("key-done").addEventListener("click", closeKeyDialog);
    $("key-dialog").addEventListener("cancel", (e) => { e.preventDefault(); closeKeyDialog(); });
    $("log-filters").addEventListener("change", () => { S.logOffset = 0; refresh(false); });
    $("log-filters").addEventListener("submit", (e) => { e.preventDefault(); S.logOffset = 0; refresh(false); });
    $("f-reset").addEventListener("click", () => { $("log-filters").reset(); S.logOffset = 0; refresh(false); });
    $("newer").addEventListener("click", () => { S.logOffset = Math.max(0, S.logOffset - LOG_PAGE); refresh(false); });
    $("older").addEventListener("click", () => { S.logOffset += LOG_PAGE; refresh(false); });
    $("export").addEventListener("click", exportCsv);
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => { if (S.view === "overview" && !$("app").hidden) { drawUsage("token"); drawUsage("channel"); } }, 150);
    });
    if (S.key) signIn(S.key);
    else signOut("");
  }

  init();
})();
