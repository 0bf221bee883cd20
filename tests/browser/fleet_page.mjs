// Drives the live fleet page in Debian's Chromium (headless) through
// playwright-core and checks what a person would see.
//
//   node fleet_page.mjs QUERY_URL TOKEN SCREENSHOT_PATH
//
// Prints one JSON line describing the page; exits non-zero on any failure.
import { chromium } from "playwright-core";

const [url, token, screenshot] = process.argv.slice(2);
const fail = (message) => { console.error(message); process.exit(1); };
if (!url || !token || !screenshot) fail("usage: node fleet_page.mjs QUERY_URL TOKEN SCREENSHOT_PATH");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const outside = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 560 } });
  page.on("request", (request) => { if (!request.url().startsWith(url)) outside.push(request.url()); });
  await page.goto(url + "/");
  // Asks for the token first.
  await page.waitForSelector("#login:not([hidden])");
  await page.fill("#token", token);
  await page.click("#login-form button");
  await page.waitForSelector("body[data-loaded=true]", { timeout: 15000 });
  const rows = await page.$$eval("#agents tbody tr", (trs) => trs.map((tr) => ({
    agent: tr.dataset.agent,
    className: tr.className,
    status: tr.querySelector(".status").textContent,
    lastSeen: tr.cells[2].textContent,
    cores: tr.cells[3].textContent,
    bars: tr.querySelectorAll(".bar").length,
    barWidths: [...tr.querySelectorAll(".bar span")].map((s) => s.style.width),
    sparkPoints: tr.querySelector("svg.spark polyline")?.getAttribute("points")?.split(" ").length || 0,
    offlineColour: getComputedStyle(tr.cells[0]).color,
    collector: tr.cells[7]?.textContent,
  })));
  const summary = await page.textContent("#summary");
  // An injected inline handler must not run: the policy allows the page's
  // own script by its hash and nothing else.
  const cspViolations = [];
  page.on("console", (message) => { if (/Content Security Policy/i.test(message.text())) cspViolations.push(message.text()); });
  await page.evaluate(() => {
    document.body.insertAdjacentHTML("beforeend", '<img id="injected" src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" onload="window.__injected = true" onerror="window.__injected = true">');
  });
  await page.waitForTimeout(500);
  const injectedHandlerRan = await page.evaluate(() => window.__injected === true);
  await page.evaluate(() => document.getElementById("injected").remove());
  const token_kept = await page.evaluate(() => sessionStorage.getItem("rollcall-token") !== null);
  // Filters match the API's: only the agent with 40 GB free qualifies.
  await page.fill("input[name=min_gpu_vram_gb]", "40");
  await page.click("#filters button");
  await page.waitForFunction(() => document.querySelectorAll("#agents tbody tr").length === 1);
  const filtered = await page.$$eval("#agents tbody tr", (trs) => trs.map((tr) => tr.dataset.agent));
  await page.fill("input[name=min_gpu_vram_gb]", "");
  await page.click("#filters button");
  await page.waitForFunction(() => document.querySelectorAll("#agents tbody tr").length === 4);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ rows, summary, token_kept, filtered, outside, injectedHandlerRan, cspViolations }));
} finally {
  await browser.close();
}
