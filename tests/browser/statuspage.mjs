// Drives vmwatch-master's status page in the system's headless Chromium (Debian package
// `chromium`) with playwright-core; never downloads a browser. Every result is one JSON
// object per line on stdout; diagnostics go to stderr.
//
// Scenario mode (tests/tests/browser.rs):
//
//   node statuspage.mjs [--token TOKEN] <url> <screenshot.png> <uuid...>
//
//   Opens the page (with --token: expects the token prompt first, takes the screenshot of it
//   and types TOKEN into it),
//   waits until a row of every uuid is shown, sets a marker variable on `window`, prints
//   {"event":"ready","rows":{uuid:{state,warnings,...}}}, then reads one JSON command per line
//   on stdin and answers each with one line:
//
//   {"cmd":"wait","uuid":U,"state":S,"warnings":[W...],"absent":false,"timeout_ms":N}
//       polls the DOM (no reload) until the row of U is in state S and shows the warnings W
//       (or, with "absent":true, until no row of U is shown) → {"event":"matched"|"timeout",...}
//   {"cmd":"filter","node":N,"state":S,"warning":W,"limit":L,"timeout_ms":N}
//   {"cmd":"click","selector":"#next"}
//       sets the given selects (or clicks) like a user and waits for the page's next
//       api/v1/vms request → {"event":"filtered","request":"api/v1/vms?...","range":...,"rows":N}
//   {"cmd":"status","state":"ok"|"error"|"auth","timeout_ms":N}
//       waits until the page's status indicator is in that state → {"event":"matched"|"timeout"}
//   {"cmd":"tolerate","pattern":RE}
//       console errors matching RE no longer fail the run (a test that stops the master on
//       purpose); they are counted as "tolerated" → {"event":"tolerating"}
//   {"cmd":"detail","uuid":U,"points":N,"idle":true,"timeout_ms":N}
//       clicks the VM's name (again every 2 s) until its detail view shows both plots with at
//       least N points, the two threshold lines, the state band, a sparkline in the table and
//       (with "idle") a shaded idle period → {"event":"detail","info":{...}}|{"event":"timeout"}
//   {"cmd":"screenshot"}  → full-page PNG at <screenshot.png> → {"event":"screenshot","path"}
//   {"cmd":"finish"}      → {"event":"result","ok":...} and exit 0 if ok, 1 otherwise: ok
//       needs no console error or warning, no uncaught page error, no request leaving the
//       master's origin, one single page load and the window marker still there.
//
// Measure mode (vmwatch-bench-page):
//
//   node statuspage.mjs --measure <url> [--loads 5] [--screenshot last-load.png]
//
//   Loads the page <loads> times (a new tab each time) and prints
//   {"event":"measure","first_rows_ms":[...],"median_ms":...}: the time from navigation
//   start to the first VM rows in the DOM (the page's `vmwatch:vms-rendered` mark).
//
// Exit status: 0 ok, 1 a check failed, 2 usage or setup error, 3 overall timeout.

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const CHROMIUM = process.env.VMWATCH_CHROMIUM || "/usr/bin/chromium";
const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const OVERALL_TIMEOUT_MS = Number(process.env.VMWATCH_BROWSER_TIMEOUT_MS || 600000);

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const log = (...a) => process.stderr.write("statuspage.mjs: " + a.join(" ") + "\n");

function usage(msg) {
  log(msg);
  log("usage: node statuspage.mjs [--token TOKEN] <url> <screenshot.png> <uuid...>");
  log("       node statuspage.mjs --measure <url> [--loads N] [--screenshot PNG]");
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { token: null, measure: false, loads: 5, screenshot: null, positional: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--token") opts.token = argv[++i] ?? usage("--token needs a value");
    else if (a === "--measure") opts.measure = true;
    else if (a === "--loads") opts.loads = Number(argv[++i]);
    else if (a === "--screenshot") opts.screenshot = argv[++i] ?? usage("--screenshot needs a path");
    else if (a.startsWith("--")) usage("unknown option " + a);
    else opts.positional.push(a);
  }
  if (!Number.isInteger(opts.loads) || opts.loads < 1) usage("--loads needs a positive integer");
  return opts;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function withBrowser(fn) {
  const userDataDir = mkdtempSync(join(tmpdir(), "vmwatch-chromium-"));
  let context;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: ARGS,
      viewport: { width: 1400, height: 900 },
      colorScheme: "light",
      locale: "en-US",
      timezoneId: "UTC",
    });
    return await fn(context);
  } finally {
    if (context) await context.close().catch(() => {});
    rmSync(userDataDir, { recursive: true, force: true });
  }
}

// Records what a page says and asks for; `problems` are what makes a run fail.
function watch(page, origin) {
  const w = { console: [], problems: [], external: [], loads: 0, apiRequests: [], vmsRequests: [], expected401: [], tolerate: [], tolerated: [], tokenSent: null };
  const pending = new Map();
  const settle = (r) => {
    const rec = pending.get(r);
    if (rec) { rec.finished = true; pending.delete(r); }
  };
  page.on("requestfinished", settle);
  page.on("requestfailed", settle);
  page.on("console", (m) => {
    const entry = { type: m.type(), text: m.text(), url: m.location().url || "" };
    w.console.push(entry);
    if (m.type() === "error" || m.type() === "warning") {
      // Before the token is typed in, the page's first API calls answer 401 and Chromium
      // reports each as a failed resource: expected, and listed apart.
      if (w.tokenSent === false && / 401 /.test(m.text())) w.expected401.push(entry);
      else if (w.tolerate.some((re) => re.test(m.text()))) w.tolerated.push(entry);
      else w.problems.push("console " + m.type() + ": " + m.text() + (entry.url ? " (" + entry.url + ")" : ""));
    }
  });
  page.on("pageerror", (e) => w.problems.push("page error: " + (e.stack || e.message || String(e))));
  page.on("crash", () => w.problems.push("the page crashed"));
  page.on("load", () => { w.loads += 1; });
  page.on("request", (r) => {
    const url = r.url();
    if (url.startsWith("data:")) return;
    if (!url.startsWith(origin)) {
      w.external.push(url);
      w.problems.push("request outside the master's origin: " + url);
      return;
    }
    if (url.startsWith(origin + "api/")) {
      const auth = r.headers()["authorization"] || "";
      w.apiRequests.push({ url: url.slice(origin.length), auth, afterToken: w.tokenSent === true });
      if (url.startsWith(origin + "api/v1/vms?")) {
        const rec = { url: url.slice(origin.length), finished: false };
        w.vmsRequests.push(rec);
        pending.set(r, rec);
      }
    }
  });
  return w;
}

// The row of one uuid as the page shows it (first row of that uuid), or null.
async function readRow(page, uuid) {
  return page.evaluate((u) => {
    const tr = Array.from(document.querySelectorAll("#vms tbody tr[data-uuid]")).find((r) => r.dataset.uuid === u);
    if (!tr) return null;
    const field = (f) => {
      const c = tr.querySelector('[data-field="' + f + '"]');
      return c ? c.textContent : null;
    };
    return {
      node: tr.dataset.node,
      name: field("name"),
      state: field("state"),
      since: field("since"),
      warnings: Array.from(tr.querySelectorAll("[data-warning]"))
        .filter((e) => e.checkVisibility())
        .map((e) => e.dataset.warning),
    };
  }, uuid);
}

async function pageInfo(page) {
  return page.evaluate(() => ({
    navigations: performance.getEntriesByType("navigation").length,
    marker: window.__vmwatchTestMarker || null,
    refreshes: window.vmwatchStatus ? window.vmwatchStatus.refreshes : null,
    status: document.getElementById("status")?.textContent || "",
    statusState: document.getElementById("status")?.dataset.state || "",
  }));
}

async function pollRows(page, uuids, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const rows = {};
    for (const u of uuids) rows[u] = await readRow(page, u);
    if (uuids.every((u) => rows[u])) return rows;
    if (Date.now() >= deadline) return { missing: uuids.filter((u) => !rows[u]), rows };
    await sleep(100);
  }
}

async function scenario(opts) {
  const [url, screenshot, ...uuids] = opts.positional;
  if (!url || !screenshot || uuids.length === 0) usage("scenario mode needs <url> <screenshot.png> <uuid...>");
  const origin = new URL(url).origin + "/";
  return withBrowser(async (context) => {
    const page = context.pages()[0] || (await context.newPage());
    const w = watch(page, origin);
    if (opts.token) w.tokenSent = false;
    await page.goto(url, { waitUntil: "load", timeout: 30000 });

    if (opts.token) {
      await page.locator("#auth").waitFor({ state: "visible", timeout: 15000 });
      const before = await pageInfo(page);
      await page.screenshot({ path: screenshot, fullPage: true });
      await page.locator("#token").fill(opts.token);
      w.tokenSent = true;
      await page.locator("#token-submit").click();
      await page.locator("#auth").waitFor({ state: "hidden", timeout: 5000 });
      emit({ event: "token-entered", status_before: before.status, expected_401: w.expected401.length });
    }

    const found = await pollRows(page, uuids, 60000);
    if (found.missing) {
      await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
      emit({ event: "result", ok: false, problems: ["rows never shown: " + found.missing.join(", ")], rows: found.rows, info: await pageInfo(page), console: w.console });
      return 1;
    }
    const marker = "m" + Math.random().toString(36).slice(2);
    await page.evaluate((m) => { window.__vmwatchTestMarker = m; }, marker);
    emit({ event: "ready", rows: found, info: await pageInfo(page) });

    const rl = createInterface({ input: process.stdin });
    for await (const line of rl) {
      if (!line.trim()) continue;
      let cmd;
      try { cmd = JSON.parse(line); } catch (e) { emit({ event: "error", error: "bad command: " + line }); continue; }
      if (cmd.cmd === "wait") {
        const t0 = Date.now();
        const deadline = t0 + (cmd.timeout_ms ?? 10000);
        const want = cmd.warnings || [];
        let row;
        for (;;) {
          row = await readRow(page, cmd.uuid);
          const ok = cmd.absent
            ? row === null
            : row !== null && (cmd.state == null || row.state === cmd.state) && want.every((x) => row.warnings.includes(x));
          if (ok) { emit({ event: "matched", uuid: cmd.uuid, row, elapsed_ms: Date.now() - t0, info: await pageInfo(page) }); break; }
          if (Date.now() >= deadline) { emit({ event: "timeout", uuid: cmd.uuid, row, elapsed_ms: Date.now() - t0, info: await pageInfo(page) }); break; }
          await sleep(50);
        }
      } else if (cmd.cmd === "filter" || cmd.cmd === "click") {
        if (cmd.cmd === "click") await page.click(cmd.selector);
        for (const [key, id] of [["node", "#f-node"], ["state", "#f-state"], ["warning", "#f-warning"], ["limit", "#f-limit"]]) {
          if (cmd.cmd === "filter" && key in cmd) await page.selectOption(id, String(cmd[key] ?? ""));
        }
        // The change handlers have run: any VMs request from now on carries the new filters
        // (one may already have gone out; then the next periodic refresh is the one).
        const from = w.vmsRequests.length;
        const deadline = Date.now() + (cmd.timeout_ms ?? 10000);
        let done = null;
        while (!done && Date.now() < deadline) {
          done = w.vmsRequests.slice(from).find((r) => r.finished);
          if (!done) await sleep(20);
        }
        if (done) {
          // Let the page render what it just received.
          await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => r())));
          const shown = await page.evaluate(() => ({
            hash: location.hash,
            range: document.getElementById("range").textContent,
            rows: document.querySelectorAll("#vms tbody tr[data-uuid]").length,
            prevDisabled: document.getElementById("prev").disabled,
            nextDisabled: document.getElementById("next").disabled,
          }));
          emit({ event: "filtered", request: done.url, ...shown });
        } else {
          emit({ event: "timeout", error: "no VMs request after the filter change" });
        }
      } else if (cmd.cmd === "status") {
        const t0 = Date.now();
        const deadline = t0 + (cmd.timeout_ms ?? 10000);
        let info;
        for (;;) {
          info = await pageInfo(page);
          if (info.statusState === cmd.state) { emit({ event: "matched", info, elapsed_ms: Date.now() - t0 }); break; }
          if (Date.now() >= deadline) { emit({ event: "timeout", info, elapsed_ms: Date.now() - t0 }); break; }
          await sleep(50);
        }
      } else if (cmd.cmd === "detail") {
        // Opens a VM's detail view like a user (its name link) and waits until its plots show
        // at least `points` points and, with "idle":true, a shaded idle period.
        const t0 = Date.now();
        const deadline = t0 + (cmd.timeout_ms ?? 20000);
        let info = null;
        for (let attempt = 0; ; attempt++) {
          if (attempt % 40 === 0) await page.click(`a[data-detail="${cmd.uuid}"]`);
          info = await page.evaluate(() => {
            const d = document.getElementById("detail");
            const count = (sel) => d.querySelectorAll(sel).length;
            return {
              shown: !d.hidden,
              points: Number(d.dataset.points || 0),
              render_ms: Number(d.dataset.renderMs || 0),
              net_path: count('svg[data-plot="net"] path.plot-line'),
              disk_path: count('svg[data-plot="disk"] path.plot-line'),
              thresholds: count("line[data-threshold]"),
              idle_net: count('svg[data-plot="net"] rect[data-idle]'),
              idle_disk: count('svg[data-plot="disk"] rect[data-idle]'),
              states: count('svg[data-plot="states"] rect'),
              // In the VM table, outside the detail view.
              sparklines: document.querySelectorAll("svg[data-spark] path").length,
              summary: document.getElementById("d-summary").textContent,
            };
          });
          info.activity_requests = w.apiRequests.filter((r) => r.url.includes("/activity")).length;
          const idle = info.idle_net + info.idle_disk > 0;
          if (info.shown && info.points >= (cmd.points ?? 1) && info.thresholds === 2 && info.net_path && info.disk_path
              && info.states > 0 && (!cmd.idle || idle) && info.sparklines > 0) {
            emit({ event: "detail", info, elapsed_ms: Date.now() - t0 });
            break;
          }
          if (Date.now() >= deadline) { emit({ event: "timeout", info, elapsed_ms: Date.now() - t0 }); break; }
          await sleep(50);
        }
      } else if (cmd.cmd === "tolerate") {
        w.tolerate.push(new RegExp(cmd.pattern));
        emit({ event: "tolerating", pattern: cmd.pattern });
      } else if (cmd.cmd === "screenshot") {
        await page.screenshot({ path: screenshot, fullPage: true });
        emit({ event: "screenshot", path: screenshot });
      } else if (cmd.cmd === "finish") {
        const info = await pageInfo(page);
        const problems = w.problems.slice();
        if (info.marker !== marker) problems.push("the window marker is gone: the page was reloaded");
        if (info.navigations !== 1) problems.push("navigation entries: " + info.navigations);
        if (w.loads !== 1) problems.push("page loads: " + w.loads);
        if (opts.token) {
          const after = w.apiRequests.filter((r) => r.afterToken);
          if (after.length === 0) problems.push("no API request after the token was entered");
          const bad = after.filter((r) => r.auth !== "Bearer " + opts.token);
          if (bad.length) problems.push(bad.length + " API requests after the token lacked it, e.g. " + bad[0].url);
          const stored = await page.evaluate(() => sessionStorage.getItem("vmwatch.api_token"));
          if (stored !== opts.token) problems.push("the token is not in sessionStorage");
        }
        const vmsRequests = w.apiRequests.filter((r) => r.url.startsWith("api/v1/vms?"));
        const eventsRequests = w.apiRequests.filter((r) => r.url.startsWith("api/v1/events?"));
        emit({
          event: "result",
          ok: problems.length === 0,
          problems,
          info,
          loads: w.loads,
          api_requests: w.apiRequests.length,
          vms_requests: vmsRequests.length,
          events_requests: eventsRequests.length,
          // The journal is followed: `after` of the reads (not the one-entry probes that find
          // its end at start) never goes back.
          events_after: eventsRequests
            .filter((r) => !/[?&]limit=1(&|$)/.test(r.url))
            .map((r) => Number(new URLSearchParams(r.url.split("?")[1]).get("after"))),
          expected_401: w.expected401.length,
          tolerated: w.tolerated.length,
          console: w.console,
        });
        rl.close();
        return problems.length === 0 ? 0 : 1;
      } else {
        emit({ event: "error", error: "unknown command " + cmd.cmd });
      }
    }
    emit({ event: "result", ok: false, problems: ["stdin closed before finish"] });
    return 1;
  });
}

async function measure(opts) {
  const [url] = opts.positional;
  if (!url) usage("--measure needs <url>");
  const origin = new URL(url).origin + "/";
  return withBrowser(async (context) => {
    const firstRows = [], wall = [], journal = [], problems = [];
    let shown = null;
    // A warm-up load (Chromium's own first-start costs are not the page's).
    for (let i = 0; i <= opts.loads; i++) {
      const page = await context.newPage();
      const w = watch(page, origin);
      const t0 = Date.now();
      await page.goto(url, { waitUntil: "commit", timeout: 60000 });
      await page.waitForFunction(() => performance.getEntriesByName("vmwatch:vms-rendered").length > 0, null, { timeout: 60000, polling: 10 });
      const t1 = Date.now();
      const m = await page.evaluate(() => {
        const mark = (n) => performance.getEntriesByName(n)[0]?.startTime ?? null;
        return {
          rows: document.querySelectorAll("#vms tbody tr[data-uuid]").length,
          count: document.getElementById("vms-count").textContent,
          range: document.getElementById("range").textContent,
          vms: mark("vmwatch:vms-rendered"),
          marks: performance.getEntriesByType("mark").map((m) => m.name + "@" + Math.round(m.startTime)),
          dom_content_loaded: Math.round(performance.getEntriesByType("navigation")[0]?.domContentLoadedEventEnd ?? 0),
          requests: performance.getEntriesByType("resource")
            .filter((r) => r.startTime < mark("vmwatch:vms-rendered"))
            .map((r) => r.name.replace(location.origin + "/", "") + " " + Math.round(r.startTime) + "→" + Math.round(r.responseEnd)),
        };
      });
      // Then the whole first refresh: nodes and the journal's tail as well.
      await page.waitForFunction(() => window.vmwatchStatus && window.vmwatchStatus.refreshes > 0, null, { timeout: 60000, polling: 10 });
      const t2 = Date.now();
      problems.push(...w.problems);
      if (opts.screenshot && i === opts.loads) await page.screenshot({ path: opts.screenshot, fullPage: true });
      await page.close();
      if (i === 0) continue;
      firstRows.push(Math.round(m.vms));
      wall.push(t1 - t0);
      journal.push(t2 - t0);
      shown = m;
    }
    const median = (a) => { const s = a.slice().sort((x, y) => x - y); return s[Math.floor(s.length / 2)]; };
    emit({
      event: "measure",
      ok: problems.length === 0,
      problems,
      loads: opts.loads,
      first_rows_ms: firstRows,
      median_ms: median(firstRows),
      wall_first_rows_ms: wall,
      first_full_refresh_ms: journal,
      median_full_refresh_ms: median(journal),
      shown,
    });
    return problems.length === 0 ? 0 : 1;
  });
}

const opts = parseArgs(process.argv.slice(2));
const watchdog = setTimeout(() => {
  emit({ event: "result", ok: false, problems: ["overall timeout of " + OVERALL_TIMEOUT_MS + " ms"] });
  process.exit(3);
}, OVERALL_TIMEOUT_MS);
watchdog.unref();
try {
  const code = await (opts.measure ? measure(opts) : scenario(opts));
  process.exitCode = code;
} catch (e) {
  log("failed:", e && e.stack ? e.stack : String(e));
  emit({ event: "result", ok: false, problems: ["driver error: " + (e && e.message ? e.message : String(e))] });
  process.exitCode = 2;
}
