// upstream-ops dashboard: plain JavaScript, no build step, no dependencies.
//
// Every piece of data from the API is put into the page as text (textContent, text nodes,
// setAttribute on SVG geometry): never as HTML. Upstream messages are attacker-influenced.
"use strict";

(() => {
  const TOKEN_KEY = "upstream-ops-token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  // The trend chart's classes (the API's group_by=category), bottom to top.
  const CATEGORIES = [
    ["rate_limited", "429 rate limited"],
    ["overloaded", "529 / 503 overloaded"],
    ["server_error", "other 5xx"],
    ["transport", "transport errors"],
    ["client_error", "other 4xx"],
    ["other", "other"],
  ];
  const FILTERS = ["time_range", "platform", "status_code", "kind", "account_id", "route", "recovered", "q"];
  const PAGE_SIZE = 50;

  const $ = (id) => document.getElementById(id);
  const form = $("filters");
  let nextCursor = null;
  let pageParams = new URLSearchParams(); // the filters the shown records were loaded with
  let generation = 0; // a newer refresh makes older answers stale

  // --- DOM helpers: text only ------------------------------------------------------------------

  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function clear(node) {
    node.replaceChildren();
    return node;
  }

  const pad = (n, width = 2) => String(n).padStart(width, "0");

  function formatTime(ms, withDate = true, withMs = false) {
    const d = new Date(ms);
    const fraction = withMs ? `.${pad(d.getMilliseconds(), 3)}` : "";
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}${fraction}`;
    return withDate ? `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}` : time;
  }

  function zoneLabel() {
    const offset = -new Date().getTimezoneOffset();
    if (offset === 0) return "UTC";
    const sign = offset > 0 ? "+" : "-";
    return `UTC${sign}${pad(Math.floor(Math.abs(offset) / 60))}:${pad(Math.abs(offset) % 60)}`;
  }

  function formatDuration(ms) {
    const units = [["d", 86400000], ["h", 3600000], ["m", 60000], ["s", 1000]];
    for (const [unit, size] of units) if (ms % size === 0) return `${ms / size}${unit}`;
    return `${ms}ms`;
  }

  const groupName = (group) => (group === null || group === undefined || group === "" ? "(none)" : String(group));

  function setStatus(text, isError = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  // --- API -------------------------------------------------------------------------------------

  class AuthNeeded extends Error {}

  class ApiError extends Error {
    constructor(message, field) {
      super(message);
      this.field = field;
    }
  }

  async function api(path, params) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    const query = params && params.toString() ? `?${params}` : "";
    const response = await fetch(`${path}${query}`, { headers, cache: "no-store" });
    if (response.status === 401) throw new AuthNeeded();
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const message = body && body.error ? body.error : `HTTP ${response.status}`;
      throw new ApiError(message, body && body.field);
    }
    return body;
  }

  function filterParams() {
    const params = new URLSearchParams();
    const data = new FormData(form);
    for (const name of FILTERS) {
      const value = String(data.get(name) || "").trim();
      if (!value) continue;
      if (name === "status_code") {
        for (const code of value.split(/[\s,]+/)) if (code) params.append(name, code);
      } else {
        params.set(name, value);
      }
    }
    return params;
  }

  function with_(params, extra) {
    const copy = new URLSearchParams(params);
    for (const [name, value] of Object.entries(extra)) copy.set(name, value);
    return copy;
  }

  function markInvalid(field) {
    for (const input of form.elements) {
      if (input.name) input.toggleAttribute("aria-invalid", input.name === field);
    }
  }

  function handleError(error) {
    if (error instanceof AuthNeeded) {
      $("token-panel").hidden = false;
      $("token-panel").elements.token.focus();
      setStatus("Enter the API token to see data.", true);
      return;
    }
    if (error instanceof ApiError) {
      markInvalid(error.field);
      setStatus(error.field ? `${error.field}: ${error.message}` : error.message, true);
      return;
    }
    setStatus(`The ops API did not answer: ${error.message}`, true);
  }

  // --- loading ---------------------------------------------------------------------------------

  async function refresh() {
    const mine = ++generation;
    const params = filterParams();
    const shown = new URLSearchParams(params);
    const openId = new URLSearchParams(location.search).get("record");
    if (openId && !$("detail").hidden) shown.set("record", openId);
    history.replaceState(null, "", `${location.pathname}${shown.toString() ? `?${shown}` : ""}`);
    markInvalid(null);
    setStatus("Loading…");
    try {
      const [trend, platforms, kinds, records] = await Promise.all([
        api("api/stats", with_(params, { group_by: "category" })),
        api("api/stats", with_(params, { group_by: "platform", top: "0" })),
        api("api/stats", with_(params, { group_by: "kind", top: "0" })),
        api("api/records", with_(params, { limit: String(PAGE_SIZE) })),
      ]);
      if (mine !== generation) return;
      $("token-panel").hidden = true;
      renderSummary(trend);
      renderTrend(trend);
      renderBars($("by-platform"), platforms.groups, "platform");
      renderBars($("by-kind"), kinds.groups, "kind");
      renderTopMessages(trend.top_messages);
      pageParams = params;
      renderRecords(records, false);
      setStatus(`Updated ${formatTime(Date.now(), false)}.`);
    } catch (error) {
      if (mine === generation) handleError(error);
    }
  }

  async function loadMore() {
    if (!nextCursor) return;
    try {
      const records = await api("api/records", with_(pageParams, { limit: String(PAGE_SIZE), cursor: nextCursor }));
      renderRecords(records, true);
    } catch (error) {
      handleError(error);
    }
  }

  // --- summary and charts ----------------------------------------------------------------------

  function renderSummary(stats) {
    const totals = stats.totals;
    $("total-events").textContent = String(totals.events);
    $("total-records").textContent = String(totals.records);
    const ratio = totals.recovered_ratio === null ? "" : ` (${Math.round(totals.recovered_ratio * 100)}%)`;
    $("total-recovered").textContent = `${totals.recovered_records}${ratio}`;
    $("window").textContent = `${formatTime(stats.window.start_ms)} – ${formatTime(stats.window.end_ms)} ${zoneLabel()}`;
    $("bucket").textContent = `per ${formatDuration(stats.bucket_ms)}`;
  }

  function renderTrend(stats) {
    const box = clear($("trend-chart"));
    const legend = clear($("trend-legend"));
    const totals = new Map(stats.groups.map((g) => [g.group, g.count]));
    for (const [category, label] of CATEGORIES) {
      const item = el("li", `cat-${category}`, el("span", "swatch"), `${label}: ${totals.get(category) || 0}`);
      item.dataset.category = category;
      legend.append(item);
    }
    const width = Math.max(box.clientWidth || 0, 480);
    const height = 220;
    const margin = { left: 44, right: 8, top: 10, bottom: 26 };
    const plotW = width - margin.left - margin.right;
    const plotH = height - margin.top - margin.bottom;
    const chart = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
    chart.append(svg("title", {}, "Upstream errors per time bucket, stacked by class"));
    const buckets = stats.buckets;
    const sums = buckets.map((b) => b.counts.reduce((total, c) => total + c.count, 0));
    const max = Math.max(1, ...sums);
    const y = (value) => margin.top + plotH - (value / max) * plotH;
    for (const value of [0, Math.ceil(max / 2), max]) {
      chart.append(svg("line", { x1: margin.left, x2: width - margin.right, y1: y(value), y2: y(value), class: "grid" }));
      chart.append(svg("text", { x: margin.left - 6, y: y(value) + 4, class: "axis", "text-anchor": "end" }, value));
    }
    const step = plotW / Math.max(1, buckets.length);
    const known = new Set(CATEGORIES.map(([c]) => c));
    buckets.forEach((bucket, i) => {
      const counts = new Map();
      for (const { group, count } of bucket.counts) {
        const category = known.has(group) ? group : "other";
        counts.set(category, (counts.get(category) || 0) + count);
      }
      let base = 0;
      for (const [category, label] of CATEGORIES) {
        const count = counts.get(category) || 0;
        if (!count) continue;
        const rect = svg("rect", {
          x: margin.left + i * step + step * 0.1,
          width: Math.max(1, step * 0.8),
          y: y(base + count),
          height: Math.max(1, y(base) - y(base + count)),
          class: `bar cat-${category}`,
          "data-category": category,
          "data-count": count,
        });
        rect.append(svg("title", {}, `${formatTime(bucket.start_ms)}: ${count} × ${label}`));
        chart.append(rect);
        base += count;
      }
    });
    const spanMs = stats.window.end_ms - stats.window.start_ms;
    const labels = Math.min(6, buckets.length);
    for (let k = 0; k < labels; k += 1) {
      const i = Math.round((k * (buckets.length - 1)) / Math.max(1, labels - 1));
      const d = new Date(buckets[i].start_ms);
      const clock = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
      const text = spanMs > 86400000 ? `${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock}` : clock;
      const anchor = k === 0 ? "start" : k === labels - 1 ? "end" : "middle";
      const x = k === 0 ? margin.left + i * step : k === labels - 1 ? margin.left + (i + 1) * step : margin.left + i * step + step / 2;
      chart.append(svg("text", { x, y: height - 8, class: "axis", "text-anchor": anchor }, text));
    }
    if (stats.totals.events === 0) {
      chart.append(svg("text", { x: margin.left + plotW / 2, y: margin.top + plotH / 2, class: "empty", "text-anchor": "middle" }, "No upstream errors in this window"));
    }
    box.append(chart);
  }

  function renderBars(list, groups, filterName) {
    clear(list);
    if (!groups.length) {
      list.append(el("li", "empty", "none"));
      return;
    }
    const max = Math.max(...groups.map((g) => g.count));
    for (const { group, count } of groups) {
      const bar = el("span", "bar");
      bar.style.width = `${Math.max(2, (count / max) * 100)}%`;
      const button = el("button", "bar-row", el("span", "name", groupName(group)), el("span", "track", bar), el("span", "count", count));
      button.type = "button";
      button.title = `Show only ${filterName} ${groupName(group)}`;
      if (group !== null && group !== undefined && group !== "") {
        button.addEventListener("click", () => {
          form.elements[filterName].value = String(group);
          refresh();
        });
      } else {
        button.disabled = true;
      }
      list.append(el("li", null, button));
    }
  }

  function renderTopMessages(messages) {
    const list = clear($("top-messages"));
    if (!messages.length) list.append(el("li", "empty", "none"));
    for (const m of messages) {
      list.append(el("li", null, el("span", "count", `${m.count}×`), " ", el("span", "message", m.message)));
    }
  }

  // --- records table ---------------------------------------------------------------------------

  function unique(values) {
    return [...new Set(values.filter((v) => v !== undefined && v !== null && v !== "" && v !== 0))];
  }

  function recordRow(record) {
    const events = record.upstream_errors;
    const upstream = record.upstream_status_code ? [record.upstream_status_code] : unique(events.map((e) => e.upstream_status_code));
    const accounts = unique(events.map((e) => e.account_name || (e.account_id ? `#${e.account_id}` : "")));
    const last = events.length ? events[events.length - 1] : null;
    const message = record.upstream_error_message || (last && last.message) || record.error || "";
    const open = el("button", "link", formatTime(record.started_at_ms));
    open.type = "button";
    open.title = "Show every attempt of this request";
    open.addEventListener("click", () => openDetail(record.request_id));
    const row = el(
      "tr",
      null,
      el("td", "time", open),
      el("td", "route", record.route || record.path || ""),
      el("td", "num", record.status_code || ""),
      el("td", "num", upstream.join(", ")),
      el("td", null, unique(events.map((e) => e.platform)).join(", ")),
      el("td", null, accounts.join(", ")),
      el("td", null, unique(events.map((e) => e.kind)).join(", ")),
      el("td", "message", message),
      el("td", null, el("span", record.recovered ? "badge yes" : "badge no", record.recovered ? "yes" : "no")),
    );
    row.dataset.requestId = record.request_id;
    row.cells[7].title = message;
    return row;
  }

  function renderRecords(page, append) {
    const body = $("records-table").tBodies[0];
    if (!append) clear(body);
    for (const record of page.records) body.append(recordRow(record));
    nextCursor = page.next_cursor;
    $("more").hidden = !nextCursor;
    $("records-empty").hidden = body.rows.length > 0;
    $("time-header").textContent = `time (${zoneLabel()})`;
  }

  // --- detail ----------------------------------------------------------------------------------

  const RECORD_FIELDS = [
    ["request_id", "request id"], ["service", "service"], ["method", "method"], ["path", "path"],
    ["route", "route"], ["status_code", "client status"], ["duration_ms", "duration (ms)"],
    ["started_at_ms", "started"], ["upstream_status_code", "upstream status"],
    ["upstream_error_message", "upstream message"], ["error", "error"], ["recovered", "recovered"],
    ["dropped_events", "events dropped"], ["trace_id", "trace id"], ["span_id", "span id"],
  ];
  const EVENT_FIELDS = [
    ["upstream_request_id", "upstream request id"], ["account_id", "account id"], ["model", "model"],
    ["method", "method"], ["upstream_url", "url"], ["attempt", "attempt"], ["duration_ms", "duration (ms)"],
    ["error_class", "error class"], ["error_type", "error type"], ["phase", "phase"],
    ["retryable", "retryable"], ["retry_after_ms", "retry after (ms)"],
    ["provider_error_type", "provider error type"], ["provider_error_code", "provider error code"],
    ["origin", "origin"],
  ];

  function fieldList(list, object, fields) {
    for (const [key, label] of fields) {
      let value = object[key];
      if (value === undefined || value === null || value === "") continue;
      if (key === "started_at_ms") value = `${formatTime(value)} ${zoneLabel()}`;
      if (typeof value === "boolean") value = value ? "yes" : "no";
      list.append(el("dt", null, label), el("dd", `field-${key}`, value));
    }
  }

  async function openDetail(requestId) {
    try {
      const body = await api(`api/records/${encodeURIComponent(requestId)}`);
      renderDetail(body.record, body.trace_url);
      const params = new URLSearchParams(location.search);
      params.set("record", requestId);
      history.replaceState(null, "", `${location.pathname}?${params}`);
    } catch (error) {
      handleError(error);
    }
  }

  function renderDetail(record, traceUrl) {
    $("detail-id").textContent = record.request_id;
    const link = $("trace-link");
    const traceOk = typeof traceUrl === "string" && /^https?:\/\//i.test(traceUrl);
    $("trace").hidden = !traceOk;
    if (traceOk) link.setAttribute("href", traceUrl);
    else link.removeAttribute("href");
    const fields = clear($("detail-fields"));
    fieldList(fields, record, RECORD_FIELDS);
    if (record.upstream_error_detail) {
      fields.append(el("dt", null, "upstream detail"), el("dd", null, el("pre", null, record.upstream_error_detail)));
    }
    const attempts = clear($("attempts"));
    if (!record.upstream_errors.length) attempts.append(el("li", "empty", "no upstream error events"));
    record.upstream_errors.forEach((event, seq) => {
      const status = event.upstream_status_code ? String(event.upstream_status_code) : "no status";
      const head = el(
        "div",
        "attempt-head",
        el("span", "seq", `#${seq + 1}`),
        el("span", "time", formatTime(event.at_unix_ms, true, true)),
        el("span", "platform", event.platform || "(no platform)"),
        el("span", "account", event.account_name || (event.account_id ? `#${event.account_id}` : "")),
        el("span", "status", status),
        el("span", "kind", event.kind || ""),
      );
      const item = el("li", "attempt", head, el("p", "message", event.message || ""));
      const more = el("dl", null);
      fieldList(more, event, EVENT_FIELDS);
      if (more.childNodes.length) item.append(more);
      if (event.detail) item.append(el("pre", "detail", event.detail));
      attempts.append(item);
    });
    $("detail").hidden = false;
    $("detail-close").focus();
  }

  function closeDetail() {
    $("detail").hidden = true;
    const params = new URLSearchParams(location.search);
    params.delete("record");
    history.replaceState(null, "", `${location.pathname}${params.toString() ? `?${params}` : ""}`);
  }

  // --- wiring ----------------------------------------------------------------------------------

  function loadFiltersFromUrl() {
    const params = new URLSearchParams(location.search);
    for (const name of FILTERS) {
      const values = params.getAll(name);
      if (!values.length) continue;
      const input = form.elements[name];
      input.value = name === "status_code" ? values.join(", ") : values[0];
    }
    return params.get("record");
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    refresh();
  });
  $("reset-filters").addEventListener("click", () => {
    form.reset();
    refresh();
  });
  $("more").addEventListener("click", loadMore);
  $("detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("detail").hidden) closeDetail();
  });
  $("token-panel").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = event.target.elements.token.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    event.target.elements.token.value = "";
    refresh();
  });

  const openId = loadFiltersFromUrl();
  refresh().then(() => {
    if (openId) openDetail(openId);
  });
})();
