// What both browser checks share: Debian's Chromium started offline-safe, and a ComfyUI page opened as a returning
// user with its console warnings/errors and page errors recorded into `result.console` / `result.page_errors`.
import { chromium } from "playwright-core";

// Without the background-networking flags Chromium keeps trying hosts this offline machine cannot reach.
const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

export function launchChromium(executablePath) {
  return chromium.launch({ executablePath, headless: true, args: CHROMIUM_ARGS });
}

/** A new page on ComfyUI at `url`, loaded and ready (graph, canvas, extensions, websocket). */
export async function openComfyPage(browser, url, result, viewport) {
  // A returning user: no template browser on first load (Comfy.TutorialCompleted) and no "Nodes 2.0" banner.
  const setting = await fetch(`${url}/settings/Comfy.TutorialCompleted`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: "true" });
  if (!setting.ok) throw new Error(`POST /settings/Comfy.TutorialCompleted: HTTP ${setting.status}`);
  const context = await browser.newContext({ viewport });
  await context.addInitScript(() => localStorage.setItem("vueNodesBannerDismissed", "true"));
  const page = await context.newPage();
  page.setDefaultTimeout(120_000);
  page.on("console", (message) => {
    if (["error", "warning"].includes(message.type())) {
      result.console.push({ type: message.type(), text: message.text(), url: message.location()?.url ?? "" });
    }
  });
  page.on("pageerror", (error) => result.page_errors.push(String(error?.stack ?? error)));
  await page.goto(url + "/", { waitUntil: "domcontentloaded" });
  await waitForApp(page);
  return page;
}

/** Until the frontend is up (after a load or a reload), then closes whatever dialog it opened on its own. */
export async function waitForApp(page) {
  await page.waitForFunction(() => {
    const app = window.comfyAPI?.app?.app;
    return Boolean(app?.graph && app.canvas && app.extensions?.length &&
      window.comfyAPI?.api?.api?.socket?.readyState === 1);
  }, null, { timeout: 120_000, polling: 200 });
  await page.keyboard.press("Escape");
}
