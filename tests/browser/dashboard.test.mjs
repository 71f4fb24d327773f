// The dashboard in a real browser: Debian's headless Chromium driven by playwright-core
// (never a downloaded browser), against `sluice dev` running a pipeline whose step
// prints ANSI red, an XSS line and numbered lines in three parts, each after a gate file
// the test creates, so the test knows the step is still running when it reloads.
//
// Run: SLUICE_BIN=target/debug/sluice node --test dashboard.test.mjs (scripts/test does).
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");
const sluice = process.env.SLUICE_BIN ?? join(process.env.CARGO_TARGET_DIR ?? join(root, "target"), "debug", "sluice");
const shots = join(here, "screenshots");
const axeSource = readFileSync(join(here, "node_modules", "axe-core", "axe.min.js"), "utf8");
const XSS_REF = "refs/heads/<script>alert(1)</script>";
const XSS_LINE = "<img src=x onerror=alert(1)>";
const XSS_GROUP = "<script>alert(2)</script> setup";
// Lines 1–6 are two groups, 7 and 8 the red and XSS lines, then "line 1"–"line 5",
// a group of three lines printed after the first gate, and "line 6"–"line 15".
const L = (n) => `build-L${n <= 5 ? 8 + n : 11 + n}`;
const DEADLINE = 30_000;

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function until(what, check) {
  const end = Date.now() + DEADLINE;
  for (;;) {
    const v = await check().catch(() => undefined);
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function run(cmd, args, env) {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { env, stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    p.stdout.on("data", (d) => (out += d));
    p.on("exit", (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(" ")}: exit ${code}`))));
  });
}

// The run id `sluice_core::run::run_id` derives: sha256(event id, 0, pipeline), 10 bytes.
function runId(eventId, pipeline) {
  const h = createHash("sha256");
  h.update(eventId);
  h.update(Buffer.from([0]));
  h.update(pipeline);
  return h.digest().subarray(0, 10).toString("hex");
}

test("the dashboard in Chromium", { timeout: 180_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "sluice-browser-"));
  const gate1 = join(dir, "gate1");
  const gate2 = join(dir, "gate2");
  mkdirSync(join(dir, "pipelines"));
  writeFileSync(
    join(dir, "pipelines", "browser.yaml"),
    [
      "name: browser",
      "steps:",
      "  - name: build",
      "    image: alpine",
      "    commands:",
      `      - echo '::group::${XSS_GROUP}'`,
      "      - echo 'inside the github group'",
      "      - echo '::endgroup::'",
      `      - printf '\\033[0Ksection_start:1700000000:deps[collapsed=true]\\r\\033[0KInstall deps\\n'`,
      "      - echo 'installing deps'",
      `      - printf '\\033[0Ksection_end:1700000001:deps\\r\\033[0K\\n'`,
      `      - printf '\\033[31mred alert\\033[0m\\n'`,
      `      - echo '${XSS_LINE}'`,
      "      - for i in 1 2 3 4 5; do echo \"line $i\"; done",
      `      - while [ ! -f ${gate1} ]; do sleep 0.1; done`,
      "      - echo '::group::late'",
      "      - echo 'in the late group'",
      "      - echo '::endgroup::'",
      "      - for i in 6 7 8 9 10; do echo \"line $i\"; done",
      `      - while [ ! -f ${gate2} ]; do sleep 0.1; done`,
      "      - for i in 11 12 13 14 15; do echo \"line $i\"; done",
      "",
    ].join("\n"),
  );
  const [natsPort, ingestPort, dashPort] = [await freePort(), await freePort(), await freePort()];
  const env = { ...process.env };
  delete env.SLUICE_NATS_URL;
  const dev = spawn(
    sluice,
    ["dev", "--pipelines", join(dir, "pipelines"), "--data", join(dir, "data"),
      "--listen", `127.0.0.1:${ingestPort}`, "--dashboard-listen", `127.0.0.1:${dashPort}`,
      "--nats-port", String(natsPort)],
    { env, stdio: ["ignore", "ignore", "inherit"] },
  );
  const base = `http://127.0.0.1:${dashPort}`;
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
  t.after(async () => {
    await browser.close();
    // SIGTERM, then SIGKILL if it has not stopped within 15 s: the test never hangs on it.
    const exited = new Promise((r) => (dev.exitCode !== null ? r() : dev.once("exit", r)));
    dev.kill("SIGTERM");
    const timer = setTimeout(() => dev.kill("SIGKILL"), 15_000);
    await exited;
    clearTimeout(timer);
    rmSync(dir, { recursive: true, force: true });
  });
  await until("the dashboard to be ready", async () =>
    (await fetch(`${base}/readyz`, { signal: AbortSignal.timeout(2_000) })).ok);
  mkdirSync(shots, { recursive: true });

  const page = await browser.newPage();
  const problems = [];
  page.on("console", (m) => { if (m.type() === "error") problems.push(m.text()); });
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("dialog", (d) => { problems.push(`a dialog opened: ${d.message()}`); d.dismiss(); });

  // A run appears on the open list without a reload.
  await page.goto(`${base}/runs`);
  const delivery = `browser-${Date.now()}`;
  const eventId = `manual:${delivery}`;
  const id = runId(eventId, "browser");
  await run(sluice, ["events", "publish", "--kind", "manual", "--pipeline", "browser", "--repo", "acme/app",
    "--ref", XSS_REF, "--id", delivery], { ...env, SLUICE_NATS_URL: `nats://127.0.0.1:${natsPort}` });
  await page.locator(`#run-${id}`).waitFor({ timeout: DEADLINE });
  assert.equal(await page.locator(`#run-${id} a`).first().textContent(), id);
  await page.screenshot({ path: join(shots, "runs.png"), fullPage: true });

  // The log streams as the step prints.
  await page.goto(`${base}/runs/${id}`);
  const log = page.locator("#step-build > ol.log");
  await until("line 5", async () => (await log.textContent()).includes("line 5"));
  writeFileSync(gate1, "");
  await until("line 10 without a reload", async () => (await log.textContent()).includes("line 10"));
  // The group printed meanwhile was folded as it streamed in: its line is inside it.
  const late = page.locator(`#${L(5)} + li.group`);
  assert.equal(await late.locator(":scope > details > summary").textContent(), "late");
  assert.equal(await late.locator(":scope > details > ol.log > li").first().textContent(), "in the late group");
  assert.equal(await late.evaluate((g) => g.classList.contains("unclosed")), false, "its end closed it");

  // A reload mid-step, then the rest: every line exactly once, numbered in order.
  await page.reload();
  await until("the reloaded page's lines", async () => (await log.textContent()).includes("line 10"));
  // From here on the page is not reloaded: a reload would drop this mark.
  await page.evaluate(() => { window.sluiceNotReloaded = true; });
  const stepState = page.locator("#step-build > summary .state");
  assert.equal(await stepState.textContent(), "running");
  writeFileSync(gate2, "");
  await until("line 15", async () => (await log.textContent()).includes("line 15"));

  // The step's state and exit code, and the run's state, change on the open page.
  await until("the step to show succeeded", async () => (await stepState.textContent()) === "succeeded");
  await until("the step's exit code", async () => (await page.locator("#step-build > summary .exit").textContent()) === "exit 0");
  await until("the run to show succeeded", async () => (await page.locator("#run-state").textContent()) === "succeeded");
  assert.equal(await page.evaluate(() => window.sluiceNotReloaded), true, "no reload");
  const texts = await page.locator("#step-build ol.log li").allTextContents();
  for (let n = 1; n <= 15; n++) {
    assert.equal(texts.filter((x) => x === `line ${n}`).length, 1, `line ${n} once in ${JSON.stringify(texts)}`);
  }
  assert.equal(await page.locator(`#${L(15)}`).textContent(), "line 15");
  const ids = await page.locator("#step-build ol.log li").evaluateAll((ls) => ls.map((l) => l.id));
  assert.deepEqual(ids, ids.map((_, i) => `build-L${i + 1}`), "lines numbered 1.. in order");

  // ANSI red is a styled span; the XSS line and branch are text.
  const red = page.locator("#step-build .ansi-red");
  assert.equal(await red.textContent(), "red alert");
  const colour = await red.evaluate((e) => getComputedStyle(e).color);
  assert.equal(colour, "rgb(255, 123, 114)");
  assert.ok(texts.includes(XSS_LINE), "the XSS line shows as text");
  assert.equal(await page.locator("#step-build ol.log img").count(), 0);
  assert.equal(await page.locator("main script").count(), 0);
  assert.equal(await page.locator("dd.ref").textContent(), XSS_REF);
  await page.screenshot({ path: join(shots, "run.png"), fullPage: true });

  // Group markers fold: GitHub's and GitLab's collapsed section open closed, their
  // titles as text; a click opens one.
  const github = page.locator("#build-L1");
  assert.equal(await github.locator(":scope > details > summary").textContent(), XSS_GROUP);
  assert.equal(await github.locator(":scope > details").evaluate((d) => d.open), false);
  assert.equal(await page.locator("#build-L2").isVisible(), false);
  assert.equal(await page.locator("#build-L4 > details > summary").textContent(), "Install deps");
  assert.equal(await page.locator("#build-L5").isVisible(), false);
  await github.locator(":scope > details > summary").click();
  await until("the group's line to show", async () => page.locator("#build-L2").isVisible());
  assert.equal(await page.locator("#build-L2").textContent(), "inside the github group");
  await page.screenshot({ path: join(shots, "groups.png"), fullPage: true });

  // Search over the loaded lines: "line 1" is in line 1 and 10–15; next and previous
  // go through them, wrapping; a match in a folded group opens it.
  const search = page.locator("#step-build .log-search input");
  const count = page.locator("#step-build .search-count");
  const current = () => page.locator("#step-build mark.current").evaluate((m) => m.closest("li").id);
  await search.fill("line 1");
  await until("the matches", async () => (await count.textContent()) === "1 of 7 in the loaded lines");
  assert.equal(await page.locator("#step-build mark").count(), 7);
  assert.equal(await current(), L(1));
  await page.locator("#step-build .log-search button", { hasText: "Next" }).click();
  assert.equal(await current(), L(10));
  assert.equal(await count.textContent(), "2 of 7 in the loaded lines");
  const previous = page.locator("#step-build .log-search button", { hasText: "Previous" });
  await previous.click();
  await previous.click();
  assert.equal(await current(), L(15), "previous wraps to the last match");
  await search.press("Enter");
  assert.equal(await current(), L(1), "Enter goes on to the next");
  await search.fill("installing");
  await until("the match in the folded group", async () => (await count.textContent()) === "1 of 1 in the loaded lines");
  assert.equal(await current(), "build-L5");
  assert.equal(await page.locator("#build-L4 > details").evaluate((d) => d.open), true);
  await search.fill("no such text");
  await until("no match", async () => (await count.textContent()) === "no match in the loaded lines");
  assert.equal(await page.locator("#step-build mark").count(), 0);
  await page.screenshot({ path: join(shots, "search.png"), fullPage: true });

  // A line link into a folded group opens it, scrolls to the line and highlights it.
  await page.goto(`${base}/runs/${id}#build-L5`);
  const grouped = page.locator("#build-L5");
  await until("line 5 in its group in view", async () => grouped.evaluate((e) => {
    const r = e.getBoundingClientRect();
    return e.closest("details").open && r.top >= 0 && r.bottom <= innerHeight && e.matches(":target");
  }));
  assert.equal(await grouped.evaluate((e) => getComputedStyle(e).backgroundColor), "rgb(59, 46, 0)");

  // A line link scrolls to its line and highlights it.
  await page.goto(`${base}/runs/${id}#${L(5)}`);
  const line = page.locator(`#${L(5)}`);
  await until("line 7 in view", async () => line.evaluate((e) => {
    const r = e.getBoundingClientRect();
    return r.top >= 0 && r.bottom <= innerHeight && e.matches(":target");
  }));
  assert.equal(await line.evaluate((e) => getComputedStyle(e).backgroundColor), "rgb(59, 46, 0)");
  await page.screenshot({ path: join(shots, "line-link.png") });

  // Every page: no accessibility violation (axe-core), a screenshot.
  for (const [name, path] of [["runs", "/runs"], ["run", `/runs/${id}`], ["event", `/events/${eventId}`],
    ["pipelines", "/pipelines"], ["pipeline", "/pipelines/browser"], ["clusters", "/clusters"]]) {
    const res = await page.goto(`${base}${path}`);
    assert.equal(res.status(), 200, path);
    // Evaluated through the DevTools protocol: the page's CSP (no inline script) stays on.
    await page.evaluate(axeSource);
    const result = await page.evaluate(() => window.axe.run());
    assert.deepEqual(result.violations.map((v) => `${v.id}: ${v.nodes.map((n) => n.target).join(" ")}`), [], path);
    await page.screenshot({ path: join(shots, `${name}-axe.png`), fullPage: true });
  }

  // A form on another origin posting to the dashboard is refused.
  const evil = await browser.newPage();
  await evil.setContent(`<form method="post" action="${base}/runs/${id}"><button>go</button></form>`);
  const [answer] = await Promise.all([
    evil.waitForResponse((r) => r.url().startsWith(base)),
    evil.click("button"),
  ]);
  assert.equal(answer.status(), 403);

  assert.deepEqual(problems, [], "no script error, CSP report or dialog");
});
