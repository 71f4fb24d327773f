// The dashboard's live parts, without any library: the run list's changes, a run's
// state and its log as they are stored, all over server-sent events; the log view's
// windowing, folded groups and search. Every value from the server is set as text
// (textContent), never parsed as HTML.
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

function lineItem(step, n, segments, cls) {
  const li = el("li", cls);
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

// A group's first line, as the server renders it: its list is inside a <details>.
function groupItem(step, n, mark) {
  const li = lineItem(step, n, [], "group unclosed");
  li.dataset.group = mark.name;
  const details = el("details");
  details.open = true;
  details.appendChild(el("summary", "group-title", mark.title));
  details.appendChild(el("ol", "log"));
  li.appendChild(details);
  return li;
}

const groupList = (li) => li.querySelector(":scope > details > ol.log");

// The groups still open at the end of `ol`, outermost first.
function openGroups(ol) {
  const chain = [];
  for (let last = ol.lastElementChild; last && last.classList.contains("unclosed");
    last = groupList(last).lastElementChild) chain.push(last);
  return chain;
}

// Appends line `n` to the step's list `ol`, into the innermost open group; a start
// marker opens a group, an end marker closes the innermost open one of its name.
function appendLine(ol, step, n, line) {
  const chain = openGroups(ol);
  const target = chain.length ? groupList(chain[chain.length - 1]) : ol;
  const mark = line.group;
  if (mark && mark.mark === "start") {
    target.appendChild(groupItem(step, n, mark));
    return;
  }
  if (mark && mark.mark === "end") {
    let i = chain.length - 1;
    while (i >= 0 && chain[i].dataset.group !== mark.name) i--;
    if (i >= 0) {
      groupList(chain[i]).appendChild(lineItem(step, n, line.segments, "group-end"));
      for (const g of chain.slice(i)) g.classList.remove("unclosed");
      return;
    }
  }
  target.appendChild(lineItem(step, n, line.segments));
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
  searchBar(d);
  return d;
}

// Drops the oldest lines (a whole group at a time) beyond MAX_LINES.
function trim(section) {
  const ol = section.querySelector(":scope > ol.log");
  let count = ol.querySelectorAll("li").length;
  while (count > MAX_LINES && ol.children.length > 1) {
    const first = ol.firstElementChild;
    count -= 1 + first.querySelectorAll("li").length;
    first.remove();
    section.dataset.first = ol.firstElementChild.id.split("-L").pop();
  }
}

function followLog(steps) {
  const url = steps.dataset.live + "?after=" + encodeURIComponent(steps.dataset.after);
  const source = new EventSource(url);
  source.addEventListener("log", (ev) => {
    const chunk = JSON.parse(ev.data);
    const section = stepSection(steps, chunk.step);
    const ol = section.querySelector(":scope > ol.log");
    let total = Number(section.dataset.total);
    for (const line of chunk.lines) {
      total += 1;
      appendLine(ol, chunk.step, total, line);
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
  const ol = section.querySelector(":scope > ol.log");
  // Folded on their own: a group that goes on into the lines shown stays unfolded.
  const page = el("ol");
  for (const l of lines) appendLine(page, section.dataset.step, l.n, l);
  for (const g of page.querySelectorAll(".unclosed")) g.classList.remove("unclosed");
  ol.prepend(...page.children);
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
  // The step and every group around the line open.
  for (let d = line.closest("details"); d; d = d.parentElement.closest("details")) d.open = true;
  line.scrollIntoView({ block: "center" });
}

// Search within a step's loaded lines: matches are wrapped in <mark>, the current one
// scrolled to (its groups opened); Enter or Next goes on, Shift+Enter or Previous back.
function searchBar(section) {
  const bar = el("div", "log-search");
  bar.setAttribute("role", "search");
  const input = el("input");
  input.type = "search";
  input.placeholder = "Search the loaded lines";
  input.setAttribute("aria-label", "Search the loaded lines of step " + section.dataset.step);
  const prev = el("button", null, "Previous");
  const next = el("button", null, "Next");
  prev.type = next.type = "button";
  const count = el("span", "search-count");
  count.setAttribute("aria-live", "polite");
  bar.append(input, " ", prev, " ", next, " ", count);
  let marks = [];
  let current = -1;
  const show = (i) => {
    if (!marks.length) return;
    if (current >= 0) marks[current].classList.remove("current");
    current = (i + marks.length) % marks.length;
    const m = marks[current];
    m.classList.add("current");
    for (let d = m.closest("details"); d; d = d.parentElement.closest("details")) d.open = true;
    m.scrollIntoView({ block: "center" });
    count.textContent = (current + 1) + " of " + marks.length + " in the loaded lines";
  };
  const search = () => {
    const ol = section.querySelector(":scope > ol.log");
    for (const m of ol.querySelectorAll("mark")) {
      const parent = m.parentNode;
      m.replaceWith(m.textContent);
      parent.normalize();
    }
    marks = [];
    current = -1;
    const q = input.value.toLowerCase();
    count.textContent = "";
    if (!q) return;
    const walker = document.createTreeWalker(ol, NodeFilter.SHOW_TEXT);
    const nodes = [];
    while (walker.nextNode()) nodes.push(walker.currentNode);
    for (const node of nodes) {
      const text = node.textContent;
      const lower = text.toLowerCase();
      let at = lower.indexOf(q);
      if (at < 0) continue;
      const parts = document.createDocumentFragment();
      let from = 0;
      for (; at >= 0; at = lower.indexOf(q, from)) {
        parts.append(text.slice(from, at));
        const m = el("mark", null, text.slice(at, at + q.length));
        marks.push(m);
        parts.append(m);
        from = at + q.length;
      }
      parts.append(text.slice(from));
      node.replaceWith(parts);
    }
    if (marks.length) show(0);
    else count.textContent = "no match in the loaded lines";
  };
  input.addEventListener("input", search);
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { ev.preventDefault(); show(current + (ev.shiftKey ? -1 : 1)); }
  });
  prev.addEventListener("click", () => show(current - 1));
  next.addEventListener("click", () => show(current + 1));
  section.querySelector(":scope > summary").after(bar);
}

document.addEventListener("DOMContentLoaded", () => {
  const steps = document.getElementById("steps");
  if (steps) for (const section of steps.querySelectorAll("details.step")) searchBar(section);
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
