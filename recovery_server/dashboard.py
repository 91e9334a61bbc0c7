"""The web dashboard: one page served by the recovery server itself, using the admin API with
the person's own token (kept in the tab's sessionStorage), so the same roles apply as on the
command line. Incidents, and for each why: the files its devices have and healthy ones do
not (correlation.py); devices, revoked ones marked, with the token that enrolled each;
remediations with their approvals; rollouts with per-wave progress (served, and counted for
the gates); approve, pause and resume from the page.

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
  <section><h2>Incidents</h2><table id="incidents"></table></section>
  <section id="why" hidden><h2 id="why-title"></h2><p id="why-notes" class="hint"></p><table id="why-table"></table></section>
  <section><h2>Remediations</h2><table id="remediations"></table></section>
  <section><h2>Rollouts</h2><div id="rollouts"></div></section>
  <section><h2>Devices</h2><table id="devices"></table></section>
  <section><h2>Audit log</h2><p id="audit"></p></section>
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
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("qmr-token") || "";

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
    for (const [key] of cols) {
      const v = row[key];
      tr.append(el("td", Array.isArray(v) ? v.join(", ") : v, key === "state" || key === "status" ? "state-" + v : ""));
    }
    if (extra) { const td = el("td"); extra(row, td); tr.append(td); }
    t.append(tr);
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

async function showWhy(incidentId) {
  const c = await api("GET", `/incidents/${encodeURIComponent(incidentId)}/correlation`);
  $("why").hidden = false;
  $("why").dataset.id = c.incident_id;
  $("why-title").textContent = `Why ${c.incident_id}: the files of its ${c.crashing_devices} devices ` +
    `against ${c.healthy_devices} healthy devices`;
  $("why-notes").textContent = c.notes.join(" ") ||
    "Most telling first: one-sided Fisher exact test; the odds ratio with 0.5 added to each cell.";
  table("why-table", [["rank", "#"], ["path", "File"], ["sha", "sha256"], ["incident", "Incident's devices"],
    ["healthy", "Healthy devices"], ["odds", "Odds ratio"], ["p", "p"], ["onset", "First seen before"]],
    c.candidates.map((x, i) => ({rank: i + 1, path: x.path + (x.version ? ` (${x.version})` : ""),
      sha: x.sha256.slice(0, 12), incident: share(x.crashing, c.crashing_devices),
      healthy: share(x.healthy, c.healthy_devices), odds: x.odds_ratio.toPrecision(3),
      p: x.p_value.toPrecision(2), onset: ago(x.onset_before_s)})));
}

function rolloutView(ro) {
  const box = el("div", null, "rollout");
  box.dataset.id = ro.rollout_id;
  const title = el("p");
  title.append(el("strong", ro.rollout_id + " "), el("span", "for " + ro.remediation_id + " "),
               el("span", ro.state, "state-" + ro.state), el("span", " " + (ro.gate || ro.reason || "")));
  box.append(title);
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
  if (ro.state === "active") box.append(button("Pause", () => api("POST", `/rollouts/${ro.rollout_id}/pause`)));
  if (ro.state === "paused" || ro.state === "halted")
    box.append(button("Resume", () => api("POST", `/rollouts/${ro.rollout_id}/resume`)));
  return box;
}

async function refresh() {
  try {
    const [me, incidents, rems, rollouts, devices, audit] = await Promise.all([
      api("GET", "/whoami"), api("GET", "/incidents"), api("GET", "/remediations"),
      api("GET", "/rollouts"), api("GET", "/devices"), api("GET", "/audit/verify")]);
    $("who").textContent = `${me.name} (${me.role})`;
    $("login").hidden = true; $("main").hidden = false; $("logout").hidden = false;
    table("incidents", [["incident_id", "Incident"], ["kind", "Kind"], ["title", "Title"],
      ["guilty_module", "Module"], ["channel_file", "File"], ["report_count", "Reports"], ["devices", "Devices"]], incidents,
      (i, td) => td.append(button("Why", () => showWhy(i.incident_id))));
    table("remediations", [["remediation_id", "Remediation"], ["status", "Status"], ["title", "Title"],
      ["author", "Author"], ["approved_by", "Approved by"], ["needed", "Approvals"]],
      rems.map((r) => ({...r, approved_by: r.approvals.map((a) => a.approver),
                        needed: `${r.approvals.length}/${r.required_approvals}`})),
      (r, td) => { if (r.status === "pending" && r.author !== me.name)
                     td.append(button("Approve", () => api("POST", `/remediations/${r.remediation_id}/approve`))); });
    $("rollouts").replaceChildren(...(rollouts.length ? rollouts.map(rolloutView) : [el("p", "none")]));
    table("devices", [["device_id", "Device"], ["state", "State"], ["recovery_attempts", "Attempts"],
      ["last_seen", "Last seen"], ["enrolled_with", "Enrolled with"]],
      devices.map((d) => ({...d, state: d.revoked_at ? "revoked" : d.state,
                           enrolled_with: d.enrolled_with || "an admin"})));
    $("audit").textContent = `${audit.entries} entries, ` + (audit.ok ? "hash chain intact" : "CHAIN BROKEN: " + audit.problems.join("; "));
    $("audit").className = audit.ok ? "ok" : "bad";
  } catch (e) {
    $("status").textContent = e.message; $("status").className = "bad";
    if (/token/.test(e.message)) { $("login").hidden = false; $("main").hidden = true; }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("qmr-token", token);
    refresh();
  });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem("qmr-token"); location.reload(); });
  if (token) refresh();
  setInterval(() => { if (token && !$("main").hidden) refresh(); }, 3000);
});
"""
