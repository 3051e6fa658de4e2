// Drives the real UI in Debian's Chromium (playwright-core, no browser download) against a running
// stack, as a person would, and writes what it saw to OUT/results.json plus screenshots; the
// pytest test tests/frontend/test_browser.py starts the stack, runs this and judges the results.
//
//   node e2e/drive.mjs '{"ui": URL, "chromium": PATH, "out": DIR, "stages": {NAME: URL, ...},
//                        "docs": URL, "apiKey": KEY}'
//
// With an apiKey (the gateway runs with TANDEM_API_KEYS) each page enters it in Settings first.
//
// It fails (exit 1, failure.png) when a step does not happen in time; the figures are judged
// by the caller.

import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const cfg = JSON.parse(process.argv[2]);
const results = {};
const STEP_MS = 30_000;

/** Sequences each stage holds now (GET /v2/models/{stage}/sequences). */
async function held() {
  const out = {};
  for (const [name, url] of Object.entries(cfg.stages)) {
    const r = await fetch(`${url}/v2/models/${name}/sequences`);
    out[name] = Object.keys((await r.json()).sequences).length;
  }
  return out;
}

async function until(what, check, ms = 5000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function fill(page, fields) {
  for (const [label, value] of Object.entries(fields)) {
    const control = page.getByLabel(label, { exact: true });
    if (typeof value === "boolean") await control.setChecked(value);
    else await control.fill(String(value));
  }
}

const text = (page, id) => page.getByTestId(id).innerText();

/** Enter the API key in Settings (kept for this tab), as a person would. */
async function apiKey(page) {
  if (!cfg.apiKey) return;
  await page.getByText("Settings", { exact: true }).click();
  await page.getByLabel("API key", { exact: true }).fill(cfg.apiKey);
  await page.getByRole("button", { name: "Save settings" }).click();
}

/** Record the length of the conversation's last answer at every change, from now on. */
async function watchAnswer(page) {
  await page.evaluate(() => {
    const list = document.querySelector('[data-testid="conversation"]');
    window.__answer = [];
    window.__answerObserver?.disconnect();
    window.__answerObserver = new MutationObserver(() => {
      const answers = list.querySelectorAll('[data-testid="answer"]');
      if (answers.length) window.__answer.push([...answers[answers.length - 1].textContent].length);
    });
    window.__answerObserver.observe(list, { childList: true, characterData: true, subtree: true });
  });
}

async function chatTurns(page) {
  await page.getByRole("tab", { name: "Chat" }).click();
  await fill(page, { "System message": "You are a test.", "Max tokens": 24, Temperature: 0, [IGNORE_EOS]: true });
  const turns = [];
  for (const message of ["Hello there", "Tell me more", "And then?"]) {
    await watchAnswer(page);
    await page.getByLabel("Message", { exact: true }).fill(message);
    await page.getByRole("button", { name: "Send" }).click();
    await page.getByTestId("status").getByText(/^Finished/).waitFor({ timeout: STEP_MS });
    const metrics = {};
    for (const id of ["ttft", "rate", "total", "prompt", "generated"]) metrics[id] = await text(page, `metric-${id}`);
    const stageTimes = {};
    for (const name of Object.keys(cfg.stages)) stageTimes[name] = await text(page, `stage-time-${name}`);
    const link = page.getByTestId("trace-link");
    turns.push({
      message,
      answer: await page.getByTestId("answer").last().textContent(),
      lengths: await page.evaluate(() => window.__answer),
      status: await text(page, "status"),
      metrics,
      stageTimes,
      traceLink: (await link.count()) ? await link.getAttribute("href") : null,
    });
  }
  const shown = await page.locator('[data-testid^="turn-"]').allInnerTexts();
  await page.screenshot({ path: join(cfg.out, "chat.png"), fullPage: true });
  return { turns, shown };
}

async function chatStop(page) {
  // room left in the tiny model's 1,024 positions after three turns
  await fill(page, { "Max tokens": 700, [IGNORE_EOS]: true });
  await page.getByLabel("Message", { exact: true }).fill("Keep going");
  await page.getByRole("button", { name: "Send" }).click();
  await until("10 tokens on screen", async () => Number(await text(page, "metric-generated")) >= 10, STEP_MS);
  const during = await held();
  await page.getByRole("button", { name: "Stop" }).click();
  await page.getByTestId("status").getByText(/^Stopped/).waitFor({ timeout: STEP_MS });
  let after = await held();
  try {
    after = await until("every stage to free the sequence", async () => {
      const now = await held();
      return Object.values(now).every((n) => n === 0) ? now : null;
    });
  } catch {
    // reported as it is; the caller judges
  }
  return {
    heldDuring: during,
    heldAfter: after,
    kvShown: await panelKV(page),
    generated: Number(await text(page, "metric-generated")),
    status: await text(page, "status"),
    last: await page.locator('[data-testid^="turn-"]').last().innerText(),
  };
}
const IGNORE_EOS = "Ignore end of text (generate exactly max tokens)";

async function nodeHealth(page) {
  const seen = {};
  for (const name of Object.keys(cfg.stages)) {
    const item = page.getByTestId(`node-${name}`);
    await item.getByText("up", { exact: true }).first().waitFor({ timeout: STEP_MS });
    seen[name] = await item.innerText();
  }
  return seen;
}

async function generate(page) {
  await page.evaluate(() => {
    const el = document.querySelector('[data-testid="output"]');
    window.__lengths = [];
    new MutationObserver(() => window.__lengths.push([...el.textContent].length)).observe(el, {
      childList: true,
      characterData: true,
      subtree: true,
    });
  });
  await page.getByRole("button", { name: "Process Input" }).click();
  await page.getByTestId("status").getByText(/^Finished/).waitFor({ timeout: STEP_MS });
  const metrics = {};
  for (const id of ["ttft", "rate", "total", "prompt", "generated"]) metrics[id] = await text(page, `metric-${id}`);
  const stageTimes = {};
  for (const name of Object.keys(cfg.stages)) stageTimes[name] = await text(page, `stage-time-${name}`);
  const link = page.getByTestId("trace-link");
  return {
    output: await page.getByTestId("output").textContent(),
    status: await text(page, "status"),
    lengths: await page.evaluate(() => window.__lengths),
    metrics,
    stageTimes,
    chart: await page.getByRole("img", { name: /Inter-token latency/ }).getAttribute("aria-label"),
    traceLink: (await link.count()) ? await link.getAttribute("href") : null,
  };
}

/** Each stage's KV line in the node health panel, once it shows the cache empty (or 5 s on). */
async function panelKV(page) {
  const shown = [];
  for (const name of Object.keys(cfg.stages)) {
    const kv = page.getByTestId(`node-${name}`).locator(".kv");
    await until(`${name}'s panel to show the cache freed`, async () =>
      (await kv.innerText()).includes(" 0 sequences"),
    ).catch(() => {}); // reported as it is; the caller judges
    shown.push(await kv.innerText());
  }
  return shown;
}

async function stopMidway(page) {
  await fill(page, { "Max tokens": 1000, [IGNORE_EOS]: true });
  await page.getByRole("button", { name: "Process Input" }).click();
  await until("10 tokens on screen", async () => Number(await text(page, "metric-generated")) >= 10, STEP_MS);
  const during = await held();
  await page.getByRole("button", { name: "Stop" }).click();
  await page.getByTestId("status").getByText(/^Stopped/).waitFor({ timeout: STEP_MS });
  const t0 = Date.now();
  let after = await held();
  try {
    after = await until("every stage to free the sequence", async () => {
      const now = await held();
      return Object.values(now).every((n) => n === 0) ? now : null;
    });
  } catch {
    // reported as it is; the caller judges
  }
  return {
    kvShown: await panelKV(page),
    heldDuring: during,
    heldAfter: after,
    freedMs: Date.now() - t0,
    generated: Number(await text(page, "metric-generated")),
    status: await text(page, "status"),
  };
}

async function refusedParameter(page) {
  await fill(page, { "Max tokens": 5, Temperature: 1000, [IGNORE_EOS]: false });
  await page.getByRole("button", { name: "Process Input" }).click();
  const alert = page.getByRole("alert");
  await alert.waitFor({ timeout: STEP_MS });
  return alert.innerText();
}

/** Every form control has an accessible name (a label or aria-label). */
function unlabelled(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll("input, textarea, select, button")]
      .filter((el) => !(el.labels?.length || el.getAttribute("aria-label") || (el.tagName === "BUTTON" && el.textContent.trim())))
      .map((el) => el.outerHTML.slice(0, 80)),
  );
}

async function narrow(browser) {
  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  await page.goto(cfg.ui);
  await apiKey(page);
  await page.reload(); // the key stays (this tab's sessionStorage); focus starts from the top again
  await nodeHealth(page);
  // keyboard only: Tab to the input text (past the view tabs), type, Ctrl+Enter runs it
  const focused = [];
  for (let i = 0; i < 2; i++) {
    await page.keyboard.press("Tab");
    focused.push(await page.evaluate(() => document.activeElement?.id));
  }
  await page.keyboard.press("Control+A");
  await page.keyboard.type("Keyboard only");
  await page.keyboard.press("Control+Enter");
  await page.getByTestId("status").getByText(/^Finished/).waitFor({ timeout: STEP_MS });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await page.screenshot({ path: join(cfg.out, "narrow.png"), fullPage: true });
  const out = { focused, overflowPx: overflow, output: await text(page, "output") };
  await page.close();
  return out;
}

// the gateway's API docs: Swagger UI renders the operations, every file from the gateway itself
async function apiDocs(browser) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const origin = new URL(cfg.docs).origin;
  const requested = [];
  page.on("request", (r) => requested.push(r.url()));
  await page.goto(cfg.docs);
  await page.locator(".swagger-ui .opblock").first().waitFor({ timeout: STEP_MS });
  const paths = await page.locator(".swagger-ui .opblock-summary-path").allTextContents();
  await page.screenshot({ path: join(cfg.out, "docs.png") });
  await page.close();
  return { paths, foreign: requested.filter((u) => !u.startsWith(origin) && !u.startsWith("data:")) };
}

// no sandbox as root; the rest keeps Chromium off the network (this machine's is closed)
const FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"];
const browser = await chromium.launch({
  executablePath: cfg.chromium,
  args: [...FLAGS, "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
results.pageErrors = []; // uncaught exceptions in the page: there should be none
page.on("pageerror", (e) => results.pageErrors.push(String(e?.stack ?? e)));
try {
  await page.goto(cfg.ui);
  await apiKey(page);
  results.nodes = await nodeHealth(page);
  results.unlabelled = await unlabelled(page);
  await fill(page, { "Input text": "Hello the model", "Max tokens": 48, Temperature: 0, [IGNORE_EOS]: true });
  results.generation = await generate(page);
  results.generation.kvShown = await panelKV(page);
  await page.screenshot({ path: join(cfg.out, "desktop.png"), fullPage: true });
  results.stop = await stopMidway(page);
  results.refused = await refusedParameter(page);
  await page.screenshot({ path: join(cfg.out, "desktop-error.png"), fullPage: true });
  results.chat = await chatTurns(page);
  results.chatStop = await chatStop(page);
  results.narrow = await narrow(browser);
  results.docs = await apiDocs(browser);
} catch (e) {
  await page.screenshot({ path: join(cfg.out, "failure.png"), fullPage: true }).catch(() => {});
  results.failure = String(e?.stack ?? e);
  process.exitCode = 1;
} finally {
  writeFileSync(join(cfg.out, "results.json"), JSON.stringify(results, null, 2));
  await browser.close();
}
