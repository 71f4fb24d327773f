// The dashboard's live parts, without any library: the run list's changes and a run's
// log as it is stored, both over server-sent events, and the log view's windowing.
// Every value from the server is set as text (textContent), never parsed as HTML.
"use strict";

// Lines kept in the page per step; earlier ones are fetched again on demand.
const MAX_LINES = 5000;
const PAGE_LINES = 500;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function lineItem(step, n, segments) {
  const li = el("li");
  li.id = step + "-L" + n;
  const a = el("a", "ln");
  a.href = "#" + li.id;
  a.setAttribute("aria-label", "line " + n);
  a.dataset.n = n;
  li.appendChild(a);
  for (const s of segments) {
    if (s.class) li.appendChild(el("span", s.class, s.text));
    else li.appendChild(document.createTextNode(s.text));
  }
  return li;
}

function stepSection(steps, name) {
  for (const d of steps.querySelectorAll("details.step")) {
    if (d.dataset.step === name) return d;
  }
  document.getElementById("no-steps")?.remove();
  const d = el("details", "step");
  d.id = "step-" + name;
  d.dataset.step = name;
  d.dataset.total = "0";
  d.dataset.first = "1";
  d.open = true;
  const summary = el("summary");
  summary.appendChild(el("span", "step-name", name));
  d.appendChild(summary);
  const ol = el("ol", "log");
  d.appendChild(ol);
  steps.appendChild(d);
  return d;
}

function trim(section) {
  const ol = section.querySelector("ol.log");
  while (ol.children.length > MAX_LINES) {
    ol.removeChild(ol.firstElementChild);
    section.dataset.first = String(Number(section.dataset.first) + 1);
  }
}

function followLog(steps) {
  const url = steps.dataset.live + "?after=" + encodeURIComponent(steps.dataset.after);
  const source = new EventSource(url);
  source.addEventListener("log", (ev) => {
    const chunk = JSON.parse(ev.data);
    const section = stepSection(steps, chunk.step);
    const ol = section.querySelector("ol.log");
    let total = Number(section.dataset.total);
    for (const segments of chunk.lines) {
      total += 1;
      ol.appendChild(lineItem(chunk.step, total, segments));
    }
    section.dataset.total = String(total);
    steps.dataset.after = ev.lastEventId;
    trim(section);
  });
}

// The run's state and each step's summary, replaced as the stored states change.
function followState(steps) {
  const source = new EventSource(steps.dataset.stateLive);
  source.addEventListener("state", (ev) => {
    const r = JSON.parse(ev.data);
    const state = document.getElementById("run-state");
    state.textContent = r.state;
    state.className = "state state-" + r.state;
    document.getElementById("run-message").textContent = r.message;
    for (const st of r.steps) {
      const summary = stepSection(steps, st.name).querySelector(":scope > summary");
      while (summary.lastChild !== summary.firstElementChild) summary.lastChild.remove();
      const add = (cls, text) => { summary.append(" "); summary.appendChild(el("span", cls, text)); };
      add("state state-" + st.state, st.state);
      if (st.exit_code !== null) add("exit", "exit " + st.exit_code);
      if (st.duration) add("duration", st.duration);
      if (st.message) add("message", st.message);
    }
    // Nothing changes after the end; closing also stops the browser reconnecting.
    if (r.final) source.close();
  });
}

async function earlier(link) {
  const section = link.closest("details.step");
  const first = Number(section.dataset.first);
  if (first <= 1) return;
  const from = Math.max(1, first - PAGE_LINES);
  const res = await fetch(link.dataset.earlier + "?from=" + from + "&to=" + (first - 1));
  if (!res.ok) return;
  const lines = await res.json();
  const ol = section.querySelector("ol.log");
  const before = ol.firstElementChild;
  for (const l of lines) ol.insertBefore(lineItem(section.dataset.step, l.n, l.segments), before);
  section.dataset.first = String(from);
  ol.start = from;
  if (from <= 1) link.parentElement.remove();
  else link.textContent = (from - 1) + " earlier lines";
}

function followRuns(box) {
  const tbody = box.querySelector("#run-rows");
  const source = new EventSource(box.dataset.live);
  source.addEventListener("reload", () => location.reload());
  source.addEventListener("run", (ev) => {
    const r = JSON.parse(ev.data);
    const tr = el("tr");
    tr.id = "run-" + r.run_id;
    tr.dataset.run = r.run_id;
    const link = (href, text) => { const a = el("a", null, text); a.href = href; return a; };
    const cells = [
      link("/runs/" + encodeURIComponent(r.run_id), r.run_id),
      link("/pipelines/" + encodeURIComponent(r.pipeline), r.pipeline),
      el("span", "state state-" + r.state, r.state),
      document.createTextNode(r.repo),
      document.createTextNode(r.branch),
      document.createTextNode(r.kind),
      el("code", null, r.sha),
      document.createTextNode(r.cluster),
      document.createTextNode(r.updated),
    ];
    for (const c of cells) { const td = el("td"); td.appendChild(c); tr.appendChild(td); }
    tr.children[4].className = "ref";
    const old = document.getElementById(tr.id);
    if (old) old.replaceWith(tr);
    else tbody.insertBefore(tr, tbody.firstElementChild);
  });
}

function highlightTarget() {
  const id = decodeURIComponent(location.hash.slice(1));
  if (!id) return;
  const line = document.getElementById(id);
  if (!line) return;
  const section = line.closest("details.step");
  if (section) section.open = true;
  line.scrollIntoView({ block: "center" });
}

document.addEventListener("DOMContentLoaded", () => {
  const steps = document.getElementById("steps");
  if (steps && steps.dataset.live) followLog(steps);
  if (steps && steps.dataset.stateLive) followState(steps);
  const runs = document.getElementById("runs");
  if (runs && runs.dataset.live) followRuns(runs);
  document.addEventListener("click", (ev) => {
    const link = ev.target.closest("a[data-earlier]");
    if (link) { ev.preventDefault(); earlier(link); }
  });
  window.addEventListener("hashchange", highlightTarget);
  highlightTarget();
});
