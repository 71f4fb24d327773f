// First paint of dashboard pages in Debian's headless Chromium (playwright-core, never a
// downloaded browser): each URL given is opened cold in a new context, and one JSON line
// per page is printed: the server's answer (responseEnd), first contentful paint and load,
// in ms from navigation start, the DOM's element count and the HTML's size.
// Run by tests/src/bin/bench_dashboard.rs (scripts/bench-dashboard).
import { chromium } from "playwright-core";

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium" });
try {
  for (const url of process.argv.slice(2)) {
    const context = await browser.newContext();
    const page = await context.newPage();
    const response = await page.goto(url, { waitUntil: "load", timeout: 600_000 });
    if (!response || !response.ok()) throw new Error(`${url}: ${response?.status()}`);
    const html = await response.body();
    const m = await page.evaluate(() => {
      const nav = performance.getEntriesByType("navigation")[0];
      const fcp = performance.getEntriesByName("first-contentful-paint")[0];
      return {
        responseEnd: nav.responseEnd,
        load: nav.loadEventEnd,
        fcp: fcp ? fcp.startTime : null,
        nodes: document.getElementsByTagName("*").length,
      };
    });
    console.log(JSON.stringify({ page: new URL(url).pathname, htmlBytes: html.length, ...m }));
    await context.close();
  }
} finally {
  await browser.close();
}
