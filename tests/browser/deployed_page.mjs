// Opens the fleet page from a deployed query function URL (served under a
// path prefix, as behind any proxy) in Debian's Chromium and reports which
// agents it shows.
//
//   node deployed_page.mjs QUERY_URL TOKEN SCREENSHOT_PATH
//
// Prints one JSON line; exits non-zero on any failure.
import { chromium } from "playwright-core";

const [url, token, screenshot] = process.argv.slice(2);
const fail = (message) => { console.error(message); process.exit(1); };
if (!url || !token || !screenshot) fail("usage: node deployed_page.mjs QUERY_URL TOKEN SCREENSHOT_PATH");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const outside = [];
const failed = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 480 } });
  page.on("request", (request) => { if (!request.url().startsWith(url)) outside.push(request.url()); });
  page.on("response", (response) => { if (response.status() >= 400) failed.push(`${response.status()} ${response.url()}`); });
  await page.goto(url + "/");
  await page.waitForSelector("#login:not([hidden])");
  await page.fill("#token", token);
  await page.click("#login-form button");
  await page.waitForSelector("body[data-loaded=true]", { timeout: 20000 });
  // The API's default lists online agents only; show every status.
  const rows = await page.$$eval("#agents tbody tr", (trs) => trs.map((tr) => ({
    agent: tr.dataset.agent,
    status: tr.querySelector(".status")?.textContent,
  })));
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ rows, outside, failed }));
} finally {
  await browser.close();
}
