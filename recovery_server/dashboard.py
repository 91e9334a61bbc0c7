"""The web dashboard: one page served by the recovery server itself, using the admin API with
the person's own token (kept in the tab's sessionStorage), so the same roles apply as on the
command line. Incidents, and for each why: the files its devices have and healthy ones do
not (correlation.py); devices, revoked ones marked, with the token that enrolled each;
remediations with their approvals; rollouts with per-wave progress (served, and counted for
the gates); known-bad rules with their approvals and the incidents they fixed; approve, pause
and resume from the page (an approver with a registered key signs from the command line).

An incident page (``#incident/INC-...``, linked from the incidents table) to run the incident
from: its reports over time, drawn here as SVG (a bar per bucket with reports, a line of
healthy boots after a directive, dashed marks where a fix got its last approval and where a
rollout was set), the crash of its first report with its excerpt, why (the correlation), the
proposed fix, its remediations with what they change, their approvals and an Approve button,
each rollout wave's served, healthy and failed devices as bars, and its devices. A device page
(``#device/ID``): its state, key, enrolment, last passed recovery test (or never), its
latest reports, directives and results, and its escrowed disk keys with every release; an
operator asks for a recovery test from there, an approver releases (or refuses) a disk key
the device asked for in recovery. They read the light views (``/incidents/{id}/summary``
and ``/timeline``, ``/devices/{id}``), not every report's diagnostics; the correlation and the
suggestion, which read every report of the incident, once per visit of the page, not at every
refresh (every 3 s). A hash route, so the back button and a link work; no server state.

No build step and no framework: the page is plain HTML, CSS and JavaScript served from here,
under a Content-Security-Policy that allows only this server's own scripts. Every value from
the server is put on the page as text (``textContent``), never as HTML.
"""

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Quick Machine Recovery</title>
<link rel="stylesheet" href="/dashboard.css">
<script src="/dashboard.js" defer></script>
</head>
<body>
<header>
  <h1>Quick Machine Recovery</h1>
  <span id="who"></span>
  <button id="logout" hidden>Sign out</button>
</header>
<p id="status" role="status"></p>
<section id="login">
  <form id="login-form">
    <label>Your admin token <input id="token" type="password" autocomplete="off" required></label>
    <button type="submit">Sign in</button>
  </form>
  <p class="hint">Get a token from an admin: <code>recovery-admin user NAME --role approver</code></p>
</section>
<main id="main" hidden>
<div id="overview">
  <section><h2>Incidents</h2><table id="incidents"></table></section>
  <section id="why" hidden><h2 id="why-title"></h2><p id="why-notes" class="hint"></p><table id="why-table"></table></section>
  <section><h2>Remediations</h2><table id="remediations"></table></section>
  <section><h2>Rollouts</h2><div id="rollouts"></div></section>
  <section><h2>Known-bad rules</h2><table id="rules"></table></section>
  <section><h2>Devices</h2><p id="devices-note" class="hint"></p><table id="devices"></table></section>
  <section><h2>Audit log</h2><p id="audit"></p></section>
</div>
<div id="incident-page" hidden>
  <p class="back"><a href="#">&larr; Overview</a></p>
  <section><h2 id="inc-title"></h2><dl id="inc-facts" class="facts"></dl></section>
  <section><h2>Reports over time</h2><p id="chart-note" class="hint"></p><div id="chart"></div><p id="chart-legend" class="legend"></p></section>
  <section><h2>Crash</h2><dl id="crash-facts" class="facts"></dl><pre id="excerpt"></pre></section>
  <section><h2 id="inc-why-title">Why</h2><p id="inc-why-notes" class="hint"></p><table id="inc-why-table"></table></section>
  <section><h2>Proposed fix</h2><div id="suggestion"></div></section>
  <section><h2>Remediations</h2><div id="inc-remediations"></div></section>
  <section><h2>Rollouts</h2><div id="inc-rollouts"></div></section>
  <section><h2>Devices</h2><p id="inc-devices" class="links"></p></section>
</div>
<div id="device-page" hidden>
  <p class="back"><a href="#">&larr; Overview</a></p>
  <section><h2 id="dev-title"></h2><dl id="dev-facts" class="facts"></dl></section>
  <section><h2>Reports</h2><p id="dev-reports-note" class="hint"></p><table id="dev-reports"></table></section>
  <section><h2>Directives</h2><p id="dev-directives-note" class="hint"></p><table id="dev-directives"></table></section>
  <section><h2>Results</h2><table id="dev-results"></table></section>
  <section><h2>Disk keys</h2><p id="dev-keys" class="hint"></p><table id="dev-releases"></table></section>
</div>
</main>
</body>
</html>
"""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2125; background: #f6f7f9; }
header { display: flex; gap: 1em; align-items: center; padding: .6em 1.2em; background: #22303c; color: #fff; }
header h1 { font-size: 1.1em; margin: 0; flex: 1; }
main, #login { padding: 0 1.2em 2em; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: .4em 1em 1em; margin-top: 1em; }
h2 { font-size: 1em; margin: .6em 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #eef0f2; vertical-align: top; }
th { font-weight: 600; color: #55606b; }
button { font: inherit; padding: .2em .8em; border-radius: 4px; border: 1px solid #8a96a3; background: #fff; cursor: pointer; }
button:hover { background: #eef3f8; }
.state-approved, .state-completed, .state-healthy, .state-active, .ok { color: #1a7f37; font-weight: 600; }
.state-halted, .state-revoked, .state-needs_manual, .state-remediation_failed, .bad { color: #c62828; font-weight: 600; }
.state-paused, .state-pending, .state-recovering { color: #9a6700; font-weight: 600; }
.wave { display: grid; grid-template-columns: 8em 1fr 26em; gap: .6em; align-items: center; margin: .3em 0; }
.bar { height: .9em; background: #eef0f2; border-radius: 3px; overflow: hidden; display: flex; }
.bar .s { background: #2da44e; } .bar .f { background: #cf222e; } .bar .p { background: #bf8700; }
.rollout { border-top: 1px solid #eef0f2; padding: .5em 0; }
.hint { color: #55606b; } #status { min-height: 1.2em; padding: 0 1.2em; }
.state-succeeded, .state-applied { color: #1a7f37; font-weight: 600; }
.state-failed, .state-rejected { color: #c62828; font-weight: 600; }
a { color: #0b5cad; } .back { margin: 1em 0 0; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; margin: .4em 0; }
.facts dt { color: #55606b; } .facts dd { margin: 0; }
pre { background: #1d2125; color: #e6edf3; padding: .8em; border-radius: 4px; overflow-x: auto; white-space: pre-wrap; }
#chart svg { width: 100%; height: auto; display: block; }
#chart .rep { fill: #cf222e; } #chart .healthy { fill: none; stroke: #2da44e; stroke-width: 2; }
#chart .axis { stroke: #8a96a3; stroke-width: 1; } #chart text { fill: #55606b; font-size: 11px; }
#chart .mark { stroke: #0b5cad; stroke-width: 1.5; stroke-dasharray: 4 3; } #chart text.mark-label { fill: #0b5cad; }
.legend span { margin-right: 1.5em; } .legend .k-rep { color: #cf222e; } .legend .k-healthy { color: #2da44e; }
.legend .k-mark { color: #0b5cad; }
.remediation { border-top: 1px solid #eef0f2; padding: .5em 0; }
.remediation ul, #suggestion ul { margin: .2em 0 .4em; padding-left: 1.4em; }
.wavebars { margin: .5em 0 .8em; } .wavebars h3 { font-size: 1em; margin: .3em 0; font-weight: 600; }
.metric { display: grid; grid-template-columns: 6em 1fr 4em; gap: .6em; align-items: center; margin: .15em 0; }
.metric .track { height: .9em; background: #eef0f2; border-radius: 3px; overflow: hidden; }
.metric .fill { display: block; height: 100%; }
.fill.served { background: #0b5cad; } .fill.healthy { background: #2da44e; } .fill.failed { background: #cf222e; }
.metric .n { text-align: right; font-variant-numeric: tabular-nums; }
.links a { margin-right: .8em; }
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let token = sessionStorage.getItem("qmr-token") || "";
// What the incident page computed once per visit: the correlation and the suggestion read every
// report of the incident (seconds at fleet scale), so they are not fetched every 3 s.
const once = {};

async function api(method, path) {
  const r = await fetch("/v1/admin" + path, {method, headers: {"Authorization": "Bearer " + token}});
  const body = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function link(text, hash) {
  const a = el("a", text);
  a.href = "#" + hash;
  return a;
}

const incidentLink = (id) => link(id, "incident/" + encodeURIComponent(id));
const deviceLink = (id) => link(id, "device/" + encodeURIComponent(id));

// cols: [key, label] or [key, label, (row) => a link element for the cell]
function table(id, cols, rows, extra) {
  const t = $(id);
  t.replaceChildren();
  const head = el("tr");
  for (const [, label] of cols) head.append(el("th", label));
  if (extra) head.append(el("th", ""));
  t.append(head);
  if (!rows.length) { const r = el("tr"); const td = el("td", "none"); td.colSpan = cols.length + 1; r.append(td); t.append(r); }
  for (const row of rows) {
    const tr = el("tr");
    tr.dataset.id = row[cols[0][0]];
    for (const [key, , linked] of cols) {
      const v = row[key];
      const td = el("td", linked ? null : Array.isArray(v) ? v.join(", ") : v,
                    key === "state" || key === "status" || key === "outcome" ? "state-" + v : "");
      if (linked) td.append(linked(row));
      tr.append(td);
    }
    if (extra) { const td = el("td"); extra(row, td); tr.append(td); }
    t.append(tr);
  }
}

function facts(id, pairs) {
  const dl = $(id);
  dl.replaceChildren();
  for (const [label, value, key] of pairs) {
    const dd = el("dd");
    if (value instanceof Node) dd.append(value); else dd.textContent = value === null || value === undefined ? "\u2014" : String(value);
    if (key) dd.dataset.key = key;
    dl.append(el("dt", label), dd);
  }
}

function button(label, onclick) {
  const b = el("button", label);
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await onclick(); $("status").textContent = label + ": done"; $("status").className = "ok"; }
    catch (e) { $("status").textContent = label + ": " + e.message; $("status").className = "bad"; }
    await refresh();
  });
  return b;
}

function share(n, total) { return `${n}/${total} (${Math.round(100 * n / Math.max(total, 1))}%)`; }

function ago(s) {
  if (s === null || s === undefined) return "?";
  const a = Math.abs(s), sign = s < 0 ? "after " : "";
  for (const [u, size] of [["d", 86400], ["h", 3600], ["m", 60]]) if (a >= size) return sign + (a / size).toFixed(1) + u;
  return sign + Math.round(a) + "s";
}

// "2026-12-01T05:42:13Z" -> "2026-12-01 05:42:13"
function when(iso) { return iso ? iso.replace("T", " ").replace(/(\+00:00|Z)$/, "") : "\u2014"; }

function describe(action) {
  const rest = Object.entries(action).filter(([k, v]) => k !== "type" && v !== null && v !== undefined)
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`);
  return action.type + (rest.length ? ": " + rest.join(", ") : "");
}

const RANKS = ["viewer", "operator", "approver", "admin"];
const atLeast = (me, role) => RANKS.indexOf(me.role) >= RANKS.indexOf(role);
function wrap(node) { const dd = el("dd"); dd.append(node); return dd; }

function list(items) {
  const ul = el("ul");
  for (const i of items) ul.append(el("li", i));
  return ul;
}

function renderWhy(c, ids) {
  $(ids.title).textContent = `Why ${c.incident_id}: the files of its ${c.crashing_devices} devices ` +
    `against ${c.healthy_devices} healthy devices`;
  $(ids.notes).textContent = c.notes.join(" ") ||
    "Most telling first: one-sided Fisher exact test; the odds ratio with 0.5 added to each cell.";
  table(ids.table, [["rank", "#"], ["path", "File"], ["sha", "sha256"], ["incident", "Incident's devices"],
    ["healthy", "Healthy devices"], ["odds", "Odds ratio"], ["p", "p"], ["onset", "First seen before"]],
    c.candidates.map((x, i) => ({rank: i + 1, path: x.path + (x.version ? ` (${x.version})` : ""),
      sha: x.sha256.slice(0, 12), incident: share(x.crashing, c.crashing_devices),
      healthy: share(x.healthy, c.healthy_devices), odds: x.odds_ratio.toPrecision(3),
      p: x.p_value.toPrecision(2), onset: ago(x.onset_before_s)})));
}

async function showWhy(incidentId) {
  const c = await api("GET", `/incidents/${encodeURIComponent(incidentId)}/correlation`);
  $("why").hidden = false;
  $("why").dataset.id = c.incident_id;
  renderWhy(c, {title: "why-title", notes: "why-notes", table: "why-table"});
}

function rolloutButtons(ro, box) {
  if (ro.state === "active") box.append(button("Pause", () => api("POST", `/rollouts/${ro.rollout_id}/pause`)));
  if (ro.state === "paused" || ro.state === "halted")
    box.append(button("Resume", () => api("POST", `/rollouts/${ro.rollout_id}/resume`)));
}

function rolloutTitle(ro) {
  const title = el("p");
  title.append(el("strong", ro.rollout_id + " "), el("span", "for " + ro.remediation_id + " "),
               el("span", ro.state, "state-" + ro.state), el("span", " " + (ro.gate || ro.reason || "")));
  return title;
}

function rolloutView(ro) {
  const box = el("div", null, "rollout");
  box.dataset.id = ro.rollout_id;
  box.append(rolloutTitle(ro));
  ro.waves.forEach((w, i) => {
    const row = el("div", null, "wave");
    row.append(el("span", (i === ro.current_wave ? "\u25b6 " : "") + w.name));
    const bar = el("div", null, "bar");
    const total = Math.max(w.counted, 1);
    for (const [cls, n] of [["s", w.succeeded], ["f", w.failed], ["p", w.pending]]) {
      const part = el("span", null, cls); part.style.width = (100 * n / total) + "%"; bar.append(part);
    }
    row.append(bar, el("span", `${w.served} served, ${w.counted} counted: ${w.succeeded} ok, ${w.failed} failed, ${w.pending} pending`));
    box.append(row);
  });
  rolloutButtons(ro, box);
  return box;
}

// The incident page's rollout: each wave's served, healthy and failed devices as bars, on one
// scale (the most served in any wave), so the waves compare.
function waveBars(ro) {
  const box = el("div", null, "rollout");
  box.dataset.id = ro.rollout_id;
  box.append(rolloutTitle(ro));
  const scale = Math.max(1, ...ro.waves.map((w) => w.served));
  ro.waves.forEach((w, i) => {
    const wave = el("div", null, "wavebars");
    wave.dataset.wave = String(i);
    wave.dataset.name = w.name;
    wave.append(el("h3", (i === ro.current_wave && ro.state !== "completed" ? "\u25b6 " : "") +
                     `Wave ${i + 1}: ${w.name}` + (w.reached ? "" : " (not reached)")));
    for (const [kind, label, n] of [["served", "Served", w.served], ["healthy", "Healthy", w.succeeded],
                                     ["failed", "Failed", w.failed]]) {
      const m = el("div", null, "metric");
      m.dataset.kind = kind;
      m.dataset.n = String(n);
      const track = el("div", null, "track");
      const fill = el("span", null, "fill " + kind);
      fill.style.width = (100 * n / scale) + "%";
      track.append(fill);
      m.append(el("span", label), track, el("span", n, "n"));
      wave.append(m);
    }
    wave.append(el("p", `${w.counted} counted for the gate, ${w.pending} pending`, "hint"));
    box.append(wave);
  });
  rolloutButtons(ro, box);
  return box;
}

// Reports per bucket as bars (one per bucket that has any), healthy boots after a directive as a
// line, and the moments a fix was approved or a rollout set as dashed lines: SVG made here.
function chart(tl) {
  const W = 900, H = 240, L = 44, R = 12, T = 34, B = 28;
  const n = tl.buckets.length, pw = W - L - R, ph = H - T - B, bw = pw / n;
  const top = Math.max(1, ...tl.buckets.map((b) => Math.max(b.reports, b.succeeded)));
  const y = (v) => T + ph - (ph * v) / top;
  const t0 = Date.parse(tl.buckets[0].start), span = n * tl.bucket_s * 1000;
  const x = (iso) => L + (pw * (Date.parse(iso) - t0)) / span;
  const s = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "reports over time"});
  s.append(svg("line", {x1: L, y1: T + ph, x2: L + pw, y2: T + ph, class: "axis"}),
           svg("line", {x1: L, y1: T, x2: L, y2: T + ph, class: "axis"}),
           svg("text", {x: L - 6, y: T + 4, "text-anchor": "end"}, top),
           svg("text", {x: L - 6, y: T + ph, "text-anchor": "end"}, 0),
           svg("text", {x: L, y: H - 8}, when(tl.buckets[0].start) + " UTC"),
           svg("text", {x: L + pw, y: H - 8, "text-anchor": "end"}, when(new Date(t0 + span).toISOString().slice(0, 19)) + " UTC"));
  tl.buckets.forEach((b, i) => {
    if (!b.reports) return;
    // Bars no wider than 48 (a short span has few, wide buckets), centred in their bucket.
    const w = Math.min(48, Math.max(bw - Math.min(2, bw / 2), 1));
    const r = svg("rect", {x: L + i * bw + (bw - w) / 2, y: y(b.reports), width: w,
                           height: T + ph - y(b.reports), class: "rep", "data-start": b.start, "data-reports": b.reports});
    r.append(svg("title", {}, `${b.reports} reports from ${when(b.start)}`));
    s.append(r);
  });
  if (tl.buckets.some((b) => b.succeeded)) {
    const pts = tl.buckets.map((b, i) => `${(L + (i + 0.5) * bw).toFixed(1)},${y(b.succeeded).toFixed(1)}`);
    const line = svg("polyline", {points: pts.join(" "), class: "healthy"});
    line.append(svg("title", {}, "healthy boots after a directive"));
    s.append(line);
  }
  tl.marks.forEach((m, i) => {
    const mx = x(m.at);
    s.append(svg("line", {x1: mx, y1: T - 4, x2: mx, y2: T + ph, class: "mark", "data-kind": m.kind}),
             svg("text", {x: mx > L + pw * 0.6 ? mx - 3 : mx + 3, y: 11 + 12 * (i % 2), class: "mark-label",
                          "text-anchor": mx > L + pw * 0.6 ? "end" : "start"}, `${m.label} ${when(m.at).slice(11, 16)}`));
  });
  $("chart").replaceChildren(s);
  const per = tl.bucket_s >= 86400 ? `${tl.bucket_s / 86400} d` : tl.bucket_s >= 3600 ? `${tl.bucket_s / 3600} h`
    : tl.bucket_s >= 60 ? `${tl.bucket_s / 60} min` : `${tl.bucket_s} s`;
  $("chart-note").textContent = `${tl.reports} reports from ${when(tl.start)} to ${when(tl.end)} UTC, per ${per}.`;
  $("chart-legend").replaceChildren(el("span", "\u25a0 reports", "k-rep"),
    el("span", "\u2014 healthy boots after a directive", "k-healthy"),
    el("span", "\u2506 fix approved, rollout set", "k-mark"));
}

function remediationView(r, me) {
  const box = el("div", null, "remediation");
  box.dataset.id = r.remediation_id;
  const head = el("p");
  head.append(el("strong", r.remediation_id + " "), el("span", r.status, "state-" + r.status),
              el("span", ` ${r.title} (by ${r.author}, ${when(r.created_at)})`));
  box.append(head, el("p", "It changes:"), list(r.actions.map(describe)));
  const approvals = el("p", null, "approvals");
  approvals.append(el("span", `Approvals ${r.approvals.length}/${r.required_approvals}: `));
  approvals.append(el("span", r.approvals.map((a) =>
    `${a.approver} (${when(a.approved_at)}${a.signed ? ", signed" : ""})`).join("; ") || "none yet"));
  box.append(approvals);
  if (r.status === "pending" && r.author !== me.name)
    box.append(button("Approve", () => api("POST", `/remediations/${r.remediation_id}/approve`)));
  return box;
}

function suggestionView(s) {
  const box = el("div");
  box.append(el("p", s.title, "title"));
  if (s.actions.length) box.append(el("p", "It would change:"), list(s.actions.map(describe)));
  else box.append(el("p", "No known fix.", "hint"));
  box.append(el("p", "Why:"), list(s.why));
  return box;
}

// Fetched once per visit of the page (see ``once``), shown when it comes.
function fetchOnce(key, path, show, box) {
  if (once[key] === undefined) {
    once[key] = null;
    box.replaceChildren(el("p", "computing\u2026", "hint"));
    api("GET", path).then((v) => { once[key] = v; if (route().join("/") === key.split("|")[0]) show(v); })
      .catch((e) => { box.replaceChildren(el("p", e.message, "bad")); });
  } else if (once[key] !== null) show(once[key]);
}

async function renderIncident(me, id) {
  const enc = encodeURIComponent(id);
  const [inc, tl, rems, rollouts] = await Promise.all([
    api("GET", `/incidents/${enc}/summary`), api("GET", `/incidents/${enc}/timeline`),
    api("GET", "/remediations"), api("GET", "/rollouts")]);
  if (route().join("/") !== "incident/" + id) return;
  $("inc-title").textContent = `${inc.incident_id}: ${inc.title}`;
  facts("inc-facts", [["Kind", inc.kind], ["Module", inc.guilty_module], ["Frame", inc.guilty_frame],
    ["Channel file", inc.channel_file], ["First seen", when(inc.first_seen)], ["Last seen", when(inc.last_seen)],
    ["Reports", inc.report_count], ["Devices", inc.devices_total]]);
  chart(tl);
  const c = inc.crash;
  facts("crash-facts", c ? [["Title", c.title], ["Kind", c.kind], ["Module", c.guilty_module],
    ["Channel file", c.channel_file], ["Source", c.source || null], ["Complete", c.corrupted ? "no: cut short or garbled" : "yes"],
    ["From report", inc.first_report_id]] : [["Crash", "its reports were pruned"]]);
  $("excerpt").textContent = c && c.excerpt ? c.excerpt : "(no excerpt)";
  fetchOnce(`incident/${id}|why`, `/incidents/${enc}/correlation`,
    (v) => renderWhy(v, {title: "inc-why-title", notes: "inc-why-notes", table: "inc-why-table"}), $("inc-why-notes"));
  fetchOnce(`incident/${id}|suggestion`, `/incidents/${enc}/suggestion`,
    (v) => $("suggestion").replaceChildren(suggestionView(v)), $("suggestion"));
  const mine = rems.filter((r) => r.incident_id === id);
  $("inc-remediations").replaceChildren(...(mine.length ? mine.map((r) => remediationView(r, me))
    : [el("p", "None yet: write one from the proposed fix (recovery-admin remediation create).", "hint")]));
  const ids = new Set(mine.map((r) => r.remediation_id));
  const ros = rollouts.filter((ro) => ids.has(ro.remediation_id));
  $("inc-rollouts").replaceChildren(...(ros.length ? ros.map(waveBars) : [el("p", "none", "hint")]));
  $("inc-devices").replaceChildren(...inc.devices.map(deviceLink),
    ...(inc.devices_total > inc.devices.length ? [el("span", `and ${inc.devices_total - inc.devices.length} more`, "hint")] : []));
  $("incident-page").dataset.id = id;
}

async function renderDevice(me, id) {
  const d = await api("GET", `/devices/${encodeURIComponent(id)}`);
  if (route().join("/") !== "device/" + id) return;
  $("dev-title").textContent = `${d.device_id}` + (d.hostname ? ` (${d.hostname})` : "");
  const state = el("span", d.revoked_at ? "revoked" : d.state, "state-" + (d.revoked_at ? "revoked" : d.state));
  facts("dev-facts", [["State", state], ["Key id", d.key_id], ["Enrolled", when(d.enrolled_at)],
    ["Enrolled with", d.enrolled_with || "an admin"], ["Last seen", when(d.last_seen)],
    ["Recovery attempts", d.recovery_attempts], ...(d.revoked_at ? [["Revoked", when(d.revoked_at)]] : []),
    ["Last passed recovery test", d.recovery_test_passed_at ? when(d.recovery_test_passed_at) : "never", "recovery-test"],
    ...(d.recovery_test_requested_at ? [["Recovery test requested", when(d.recovery_test_requested_at)]] : [])]);
  $("dev-reports-note").textContent = d.reports_total > d.reports.length ? `the latest ${d.reports.length} of ${d.reports_total}` : "";
  table("dev-reports", [["report_id", "Report"], ["incident_id", "Incident", (r) => incidentLink(r.incident_id)],
    ["received_at", "Received"], ["title", "Crash"]], d.reports.map((r) => ({...r, received_at: when(r.received_at)})));
  $("dev-directives-note").textContent = d.directives_total > d.directives.length ? `the latest ${d.directives.length} of ${d.directives_total}` : "";
  table("dev-directives", [["directive_id", "Directive"], ["remediation_id", "Remediation"], ["report_id", "For report"],
    ["wave", "Wave"], ["issued_at", "Issued"], ["outcome", "Outcome"], ["outcome_at", "Outcome at"]],
    d.directives.map((x) => ({...x, wave: x.wave === null ? "\u2014" : x.wave + 1, issued_at: when(x.issued_at), outcome_at: when(x.outcome_at)})));
  table("dev-results", [["directive_id", "Directive"], ["outcome", "Outcome"], ["received_at", "Received"], ["error", "Error"]],
    d.results.map((r) => ({...r, received_at: when(r.received_at), error: r.error || ""})));
  const enc = encodeURIComponent(id);
  if (atLeast(me, "operator") && !d.revoked_at && !d.recovery_test_requested_at)
    $("dev-facts").append(el("dt", ""), wrap(button("Ask for a recovery test", () => api("POST", `/devices/${enc}/recovery-test`))));
  const k = await api("GET", `/devices/${enc}/disk-keys`);
  if (route().join("/") !== "device/" + id) return;
  $("dev-keys").textContent = `Release policy ${k.policy}. ` + (k.keys.length
    ? "Keys: " + k.keys.map((x) => `${x.key_id} (slot ${x.slot}, ${x.state}${x.tpm_sealed ? ", TPM-sealed device key" : ""})`).join("; ")
    : "No disk key escrowed.");
  table("dev-releases", [["release_id", "Release"], ["state", "State"], ["report_id", "For report"],
    ["requested_at", "Asked"], ["decided_by", "Decided by"], ["released", "Released"]],
    k.releases.map((r) => ({...r, requested_at: when(r.requested_at), decided_by: r.decided_by || ""})),
    (r, td) => { if (r.state === "pending" && atLeast(me, "approver")) td.append(
      button("Release the key", () => api("POST", `/key-releases/${encodeURIComponent(r.release_id)}/approve`)),
      button("Refuse", () => api("POST", `/key-releases/${encodeURIComponent(r.release_id)}/refuse`))); });
  $("device-page").dataset.id = id;
}

// The overview asks for the first devices only: a fleet's list is megabytes, every 3 s.
const OVERVIEW_DEVICES = 200;

async function renderOverview(me) {
  const [incidents, rems, rollouts, devices, audit, rules] = await Promise.all([
    api("GET", "/incidents"), api("GET", "/remediations"),
    api("GET", "/rollouts"), api("GET", `/devices?limit=${OVERVIEW_DEVICES}`), api("GET", "/audit/verify"),
    api("GET", "/rules")]);
  if (route()[0] !== "overview") return;
  table("incidents", [["incident_id", "Incident", (i) => incidentLink(i.incident_id)], ["kind", "Kind"], ["title", "Title"],
    ["guilty_module", "Module"], ["channel_file", "File"], ["report_count", "Reports"], ["devices_total", "Devices"]], incidents,
    (i, td) => td.append(button("Why", () => showWhy(i.incident_id))));
  table("remediations", [["remediation_id", "Remediation"], ["status", "Status"], ["title", "Title"],
    ["author", "Author"], ["approved_by", "Approved by"], ["needed", "Approvals"]],
    rems.map((r) => ({...r, approved_by: r.approvals.map((a) => a.approver),
                      needed: `${r.approvals.length}/${r.required_approvals}`})),
    (r, td) => { if (r.status === "pending" && r.author !== me.name)
                   td.append(button("Approve", () => api("POST", `/remediations/${r.remediation_id}/approve`))); });
  $("rollouts").replaceChildren(...(rollouts.length ? rollouts.map(rolloutView) : [el("p", "none")]));
  table("rules", [["rule_id", "Rule"], ["status", "Status"], ["title", "Title"], ["path_pattern", "Path pattern"],
    ["sha", "sha256"], ["needed", "Approvals"], ["uses", "Incidents fixed"]],
    rules.map((r) => ({...r, sha: r.sha256.slice(0, 12) + "…", needed: `${r.approvals.length}/${r.required_approvals}`,
                       uses: r.uses.length})),
    (r, td) => { if (r.status === "pending" && r.author !== me.name && atLeast(me, "approver"))
                   td.append(button("Approve", () => api("POST", `/rules/${encodeURIComponent(r.rule_id)}/approve`))); });
  table("devices", [["device_id", "Device", (d) => deviceLink(d.device_id)], ["state", "State"], ["recovery_attempts", "Attempts"],
    ["last_seen", "Last seen"], ["enrolled_with", "Enrolled with"], ["tested", "Recovery test passed"]],
    devices.map((d) => ({...d, state: d.revoked_at ? "revoked" : d.state,
                         enrolled_with: d.enrolled_with || "an admin",
                         tested: d.recovery_test_passed_at ? when(d.recovery_test_passed_at) : "never"})));
  $("devices-note").textContent = devices.length === OVERVIEW_DEVICES
    ? `the first ${OVERVIEW_DEVICES} by id: recovery-admin devices lists them all` : "";
  $("audit").textContent = `${audit.entries} entries, ` + (audit.ok ? "hash chain intact" : "CHAIN BROKEN: " + audit.problems.join("; "));
  $("audit").className = audit.ok ? "ok" : "bad";
}

// The page shown: #incident/ID, #device/ID, or the overview.
function route() {
  const h = location.hash.slice(1);
  const slash = h.indexOf("/");
  const page = slash < 0 ? "" : h.slice(0, slash);
  let id = "";
  try { id = decodeURIComponent(h.slice(slash + 1)); } catch (e) { return ["overview"]; }
  return (page === "incident" || page === "device") && id ? [page, id] : ["overview"];
}

const PAGES = {overview: "overview", incident: "incident-page", device: "device-page"};

async function refresh() {
  const [page, id] = route();
  try {
    const me = await api("GET", "/whoami");
    $("who").textContent = `${me.name} (${me.role})`;
    $("login").hidden = true; $("main").hidden = false; $("logout").hidden = false;
    for (const [name, box] of Object.entries(PAGES)) $(box).hidden = name !== page;
    if (page === "incident") await renderIncident(me, id);
    else if (page === "device") await renderDevice(me, id);
    else await renderOverview(me);
  } catch (e) {
    $("status").textContent = e.message; $("status").className = "bad";
    if (/token/.test(e.message)) { $("login").hidden = false; $("main").hidden = true; }
  }
}

// Leaving a page: what it showed goes, so another incident or device never shows the last one's.
function cleared() {
  for (const key of Object.keys(once)) delete once[key];
  for (const box of ["incident-page", "device-page"]) {
    delete $(box).dataset.id;
    for (const e of $(box).querySelectorAll("h2[id], dl, table, pre, p[id], #chart, #suggestion, #inc-remediations, #inc-rollouts"))
      e.replaceChildren();
  }
  $("status").textContent = "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("qmr-token", token);
    refresh();
  });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem("qmr-token"); location.reload(); });
  window.addEventListener("hashchange", () => { cleared(); window.scrollTo(0, 0); if (token) refresh(); });
  if (token) refresh();
  setInterval(() => { if (token && !$("main").hidden) refresh(); }, 3000);
});
"""
