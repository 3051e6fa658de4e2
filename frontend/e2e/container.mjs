// Drives the UI as the frontend container serves it (nginx, the API on the same origin) in Debian's
// Chromium (playwright-core): the node panel fills, one generation finishes. Writes what it saw to
// OUT/results.json: the page's own requests' origins and any console error (a CORS refusal shows
// there), for tests/infra/test_containers.py to judge.
//
//   node e2e/container.mjs '{"ui": URL, "chromium": PATH, "out": DIR, "stages": [NAME, ...]}'

import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const cfg = JSON.parse(process.argv[2]);
const STEP_MS = 60_000;
const results = { requests: [], consoleErrors: [] };

const FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"];
const browser = await chromium.launch({ executablePath: cfg.chromium, args: [...FLAGS, "--disable-sync"] });
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
page.on("request", (r) => results.requests.push(r.url()));
page.on("console", (m) => m.type() === "error" && results.consoleErrors.push(m.text()));
try {
  await page.goto(cfg.ui);
  results.nodes = {};
  for (const name of cfg.stages) {
    const item = page.getByTestId(`node-${name}`);
    await item.getByText("up", { exact: true }).first().waitFor({ timeout: STEP_MS });
    results.nodes[name] = await item.innerText();
  }
  await page.getByLabel("Input text", { exact: true }).fill("Hello the model");
  await page.getByLabel("Max tokens", { exact: true }).fill("12");
  await page.getByLabel("Temperature", { exact: true }).fill("0");
  await page.getByLabel("Ignore end of text (generate exactly max tokens)", { exact: true }).setChecked(true);
  await page.getByRole("button", { name: "Process Input" }).click();
  await page.getByTestId("status").getByText(/^Finished/).waitFor({ timeout: STEP_MS });
  results.status = await page.getByTestId("status").innerText();
  results.output = await page.getByTestId("output").textContent();
  results.generated = await page.getByTestId("metric-generated").innerText();
  await page.screenshot({ path: join(cfg.out, "container-ui.png"), fullPage: true });
} catch (e) {
  await page.screenshot({ path: join(cfg.out, "failure.png"), fullPage: true }).catch(() => {});
  results.failure = String(e?.stack ?? e);
  process.exitCode = 1;
} finally {
  await browser.close();
  writeFileSync(join(cfg.out, "results.json"), JSON.stringify(results, null, 2));
}
