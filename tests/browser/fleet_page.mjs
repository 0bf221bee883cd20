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

// One refresh loop however often Apply is pressed, none while the tab is
// hidden, and each agent's history at most once a minute. The page's
// timers run on a fake clock; its requests are real.
async function refreshDiscipline() {
  const page = await browser.newPage();
  await page.clock.install();
  const calls = [];
  page.on("request", (request) => {
    const path = request.url().slice(url.length);
    if (path.startsWith("/v1/agents?")) calls.push("list");
    else if (path.includes("/history")) calls.push("history");
  });
  const count = (kind) => calls.filter((call) => call === kind).length;
  const advance = async (times) => {
    for (let i = 0; i < times; i++) { await page.clock.runFor(10000); await page.waitForTimeout(700); }
  };
  const setHidden = (hidden) => page.evaluate((hidden) => {
    Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
    Object.defineProperty(document, "visibilityState", { configurable: true, get: () => hidden ? "hidden" : "visible" });
    document.dispatchEvent(new Event("visibilitychange"));
  }, hidden);
  await page.goto(url + "/");
  await page.waitForSelector("#login:not([hidden])");
  await page.fill("#token", token);
  await page.click("#login-form button");
  await page.waitForSelector("body[data-loaded=true]", { timeout: 15000 });
  // Apply pressed three times while a refresh runs.
  await page.evaluate(() => { for (let i = 0; i < 3; i++) document.getElementById("filters").requestSubmit(); });
  await page.waitForTimeout(1500);
  const before = { list: count("list"), history: count("history") };
  await advance(3);
  const thirtySeconds = { list: count("list") - before.list, history: count("history") - before.history };
  await setHidden(true);
  const hiddenFrom = count("list");
  await advance(3);
  const whileHidden = count("list") - hiddenFrom;
  await setHidden(false);
  await page.waitForTimeout(700);
  const onShow = count("list") - hiddenFrom - whileHidden;
  await page.close();
  return { thirtySeconds, whileHidden, onShow };
}

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
    holders: [...tr.querySelectorAll(".holder")].map((h) => h.textContent),
    sparkPoints: tr.querySelector("svg.spark polyline")?.getAttribute("points")?.split(" ").length || 0,
    offlineColour: getComputedStyle(tr.cells[0]).color,
    collector: tr.cells[7]?.textContent,
  })));
  const summary = await page.textContent("#summary");
  await page.hover("tr[data-agent=alpha] .gpus");
  await page.waitForFunction(() => document.querySelector("tr[data-agent=alpha] .gpu").title.startsWith("pid"), null, { timeout: 5000 });
  const processesTitle = await page.$eval("tr[data-agent=alpha] .gpu", (line) => line.title);
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
  const refresh = await refreshDiscipline();
  console.log(JSON.stringify({ rows, summary, processesTitle, token_kept, filtered, outside, injectedHandlerRan, cspViolations, refresh }));
} finally {
  await browser.close();
}
