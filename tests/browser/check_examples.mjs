// Headless-Chromium check of every example workflow in ComfyUI's real frontend, opened from the template browser.
//
//   node check_examples.mjs <comfyui-url> <api-dir> <out-dir> [--timeout-s 900] [--chromium /usr/bin/chromium]
//                           [--open-only name,name]
//
// For each workflows/api/<name>.json: opens Templates (the template browser), picks the pack's "sfgrpo" category
// and clicks the <name> card; records where the graph's nodes are on the page (the whole graph should be in view,
// clear of the side bar, the tabs, the run bar and the minimap) and the frontend's graphToPrompt() (it should be the
// API file); shrinks training to one iteration, queues it, waits for the end, fits the view again so that every
// node is drawn (the frontend grows a node for its image previews when it draws it) and records the nodes again
// (nothing should overlap), with what the pack's nodes show. Writes <out-dir>/result.json and, per example,
// <name>_opened.png and <name>_after.png. Exits 0 when it could collect the result (the assertions are
// tests/comfy/test_browser.py's), 2 when it could not. --open-only names examples that are opened and read but not
// queued (the templates for real models, whose weights the test server lacks).
import { mkdirSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { launchChromium, openComfyPage } from "./comfy_page.mjs";

// Train LoRA at test size (the widget names of nodes/train.py) and the caption lists at one per category.
const ONE_ITERATION = { iterations: 1, group_size: 2, groups_per_iteration: 1, steps: 4, substeps: 1,
  eval_samples: 1, checkpoint_every: 1, eval_every: 1 };
// Credit Signal at test size: one batch of 2 groups of 4, 2 continuations per state.
const SMALL_SIGNAL = { batches: 1, continuations: 2, group_size: 4, groups: 2, steps: 4 };
// What lies over the canvas (frontend 1.32): the side bar, the workflow tabs, the run bar and the minimap.
const OVERLAYS = { sidebar: ".side-tool-bar-container", tabs: ".workflow-tabs-container",
  run_bar: ".queue-button-group", minimap: ".litegraph-minimap" };

function parseArgs(argv) {
  const [url, apiDir, outDir, ...rest] = argv;
  if (!url || !apiDir || !outDir) {
    console.error("usage: node check_examples.mjs <comfyui-url> <api-dir> <out-dir> [--timeout-s N] [--chromium PATH]");
    process.exit(2);
  }
  const options = { url: url.replace(/\/$/, ""), apiDir, outDir, timeoutS: 900, chromium: "/usr/bin/chromium",
    openOnly: [] };
  for (let i = 0; i < rest.length; i += 2) {
    if (rest[i] === "--timeout-s") options.timeoutS = Number(rest[i + 1]);
    else if (rest[i] === "--chromium") options.chromium = rest[i + 1];
    else if (rest[i] === "--open-only") options.openOnly = rest[i + 1].split(",").filter(Boolean);
    else { console.error(`unknown option ${rest[i]}`); process.exit(2); }
  }
  return options;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  mkdirSync(options.outDir, { recursive: true });
  const names = readdirSync(options.apiDir).filter((file) => file.endsWith(".json")).map((file) => basename(file, ".json"))
    .sort();
  const result = { url: options.url, console: [], page_errors: [], examples: {} };
  const save = () => writeFileSync(join(options.outDir, "result.json"), JSON.stringify(result, null, 2));
  const browser = await launchChromium(options.chromium);
  try {
    const page = await openComfyPage(browser, options.url, result, { width: 1600, height: 1000 });
    await page.waitForTimeout(500);
    await page.evaluate(() => { // once: what each queued example ends with, and its training events
      const { api } = window.comfyAPI.api;
      api.addEventListener("sfgrpo.training", () => { window.__sfgrpoExample.events += 1; });
      for (const kind of ["execution_success", "execution_error", "execution_interrupted"]) {
        api.addEventListener(kind, (event) => {
          window.__sfgrpoExample.end ??= { kind, detail: JSON.parse(JSON.stringify(event.detail ?? null)) };
        });
      }
    });

    for (const name of names) {
      const example = { name };
      result.examples[name] = example;
      const api = JSON.parse(readFileSync(join(options.apiDir, `${name}.json`), "utf8"));
      example.template_card = await openFromTemplateBrowser(page, name);
      await page.waitForFunction((expected) => window.comfyAPI.app.app.graph._nodes.length === expected,
        Object.keys(api).length + 1, { timeout: 30_000 }).catch(() => {}); // the API's nodes and the note
      await page.waitForTimeout(1000); // fitView runs on the next animation frame; DOM widgets follow
      example.opened = await layout(page);
      example.prompt = await page.evaluate(async () => (await window.comfyAPI.app.app.graphToPrompt()).output);
      await page.screenshot({ path: join(options.outDir, `${name}_opened.png`) });
      example.queued = !options.openOnly.includes(name);
      if (!example.queued) { save(); continue; }

      await page.evaluate(({ training, signal }) => {
        const app = window.comfyAPI.app.app;
        const set = (node, values) => {
          for (const [key, value] of Object.entries(values)) {
            const widget = node.widgets?.find((candidate) => candidate.name === key);
            if (!widget) throw new Error(`${node.type} has no widget ${key}`);
            widget.value = value;
          }
        };
        const stamp = Date.now().toString(36);
        for (const node of app.graph._nodes) {
          if (node.type === "SFGRPOTrainLoRA") set(node, { ...training, run_name: `examples_${stamp}` });
          if (node.type === "SFGRPOCreditSignal") set(node, signal);
          if (node.type === "SFGRPOMiniWorldPromptList") set(node, { per_category: 1 });
          if (node.type === "SaveLoRA") set(node, { prefix: `loras/examples_${stamp}` });
        }
        window.__sfgrpoExample = { end: null, events: 0 };
      }, { training: ONE_ITERATION, signal: SMALL_SIGNAL });
      const queuedAt = Date.now();
      await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0));
      await page.waitForFunction(() => window.__sfgrpoExample.end !== null, null,
        { timeout: options.timeoutS * 1000, polling: 250 });
      example.run_s = (Date.now() - queuedAt) / 1000;
      Object.assign(example, await page.evaluate(() => window.__sfgrpoExample)); // end, events
      await page.waitForTimeout(800); // the last "executed" messages
      await fitView(page);
      example.after = await layout(page);
      example.shown = await shownOnNodes(page);
      await page.screenshot({ path: join(options.outDir, `${name}_after.png`) });
      save();
    }
  } finally {
    save();
    await browser.close();
  }
}

/** Templates > sfgrpo > the card called `name`, as a user clicks them; returns the card's title. */
async function openFromTemplateBrowser(page, name) {
  await page.evaluate(() => window.comfyAPI.app.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
  const dialog = page.locator("[role=dialog]").last();
  await dialog.getByText("sfgrpo", { exact: true }).click();
  const card = dialog.locator("h3", { hasText: new RegExp(`^\\s*${name}\\s*$`) }).first();
  const title = (await card.textContent()).trim();
  await card.click();
  await page.waitForFunction(() => !document.querySelector("[role=dialog]"), null, { timeout: 30_000 });
  return title;
}

/** The frontend's own "Fit view" command (key "."), and two redraws, so that every node is drawn (and sized) at least once. */
async function fitView(page) {
  await page.evaluate(async () => {
    const app = window.comfyAPI.app.app;
    await app.extensionManager.command.execute("Comfy.Canvas.FitView");
    for (let i = 0; i < 2; i += 1) {
      app.canvas.setDirty(true, true);
      app.canvas.draw(true, true);
      await new Promise((resolve) => requestAnimationFrame(resolve));
    }
  });
  await page.waitForTimeout(700);
}

/** Every node's box in graph units (title bar included) and on the page, the view, and the overlays' boxes. */
function layout(page) {
  return page.evaluate((overlays) => {
    const app = window.comfyAPI.app.app;
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const { scale, offset } = app.canvas.ds;
    const canvasRect = app.canvas.canvas.getBoundingClientRect();
    const box = (rect) => rect && rect.width > 0 && rect.height > 0
      ? { x: rect.x, y: rect.y, width: rect.width, height: rect.height } : null;
    const nodes = app.graph._nodes.map((node) => {
      const graph = { x: node.pos[0], y: node.pos[1] - title, width: node.size[0], height: node.size[1] + title };
      const screen = { x: canvasRect.left + (graph.x + offset[0]) * scale, y: canvasRect.top + (graph.y + offset[1]) * scale,
        width: graph.width * scale, height: graph.height * scale };
      return { id: node.id, type: node.type, title: node.title, graph, screen };
    });
    const covers = {};
    for (const [key, selector] of Object.entries(overlays)) {
      const element = document.querySelector(selector);
      covers[key] = element && getComputedStyle(element).visibility !== "hidden" ? box(element.getBoundingClientRect()) : null;
    }
    return { scale, offset: [...offset], canvas: box(canvasRect), viewport: [window.innerWidth, window.innerHeight],
      nodes, overlays: covers };
  }, OVERLAYS);
}

/** What the pack's nodes show after the run: Score and Train LoRA text, Tweedie Preview images, the training view. */
function shownOnNodes(page) {
  return page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const text = (node) => node.widgets?.find((widget) => widget.name === "sfgrpo_text")?.value ?? null;
    const images = (node) => app.nodeOutputs?.[String(node.id)]?.images?.length ?? 0;
    const shown = [];
    for (const node of app.graph._nodes) {
      const entry = { id: node.id, type: node.type, text: text(node), images: images(node) };
      const view = node.sfgrpoView;
      if (view) {
        entry.chart_points = Number(view.canvas.dataset.points);
        entry.strip_steps = Number(view.strip?.dataset.steps ?? 0);
        entry.strip_loaded = Boolean(view.strip?.complete && view.strip.naturalWidth > 0);
        entry.strip_size = view.strip ? [view.strip.naturalWidth, view.strip.naturalHeight] : null;
      }
      shown.push(entry);
    }
    return shown;
  });
}

main().catch((error) => {
  console.error(error?.stack ?? String(error));
  process.exit(2);
});
