// Headless-Chromium check of the sfgrpo live training view in ComfyUI's real frontend.
//
//   node check_training_view.mjs <comfyui-url> <out-dir> [--timeout-s 600] [--chromium /usr/bin/chromium]
//
// Opens the page, loads the pack's train_lora template (GET /api/workflow_templates/sfgrpo/train_lora.json), shrinks
// the Train LoRA node to a 2-iteration run, queues it, waits for the prompt to finish and writes into <out-dir>:
// result.json (what the page shows: the chart's points, the status line, the nodes' text outputs, every console
// warning/error and page error), page.png, train_node.png (the Train LoRA node) and chart.png (the chart widget).
// When the server has the GET /sfgrpo/training route it also reloads the page and records whether the chart refills
// (reload.png). It exits 0 when it could collect the result (the assertions are tests/comfy/test_browser.py's), 2
// when it could not.
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { launchChromium, openComfyPage, waitForApp } from "./comfy_page.mjs";

// The Train LoRA node at test size (the widget names of nodes/train.py) and the caption lists at one per category.
const SMALL_TRAINING = { iterations: 2, group_size: 2, groups_per_iteration: 2, steps: 4, substeps: 1,
  eval_samples: 1, checkpoint_every: 1, eval_every: 1 };
const SMALL_CAPTIONS = { per_category: 1 };

function parseArgs(argv) {
  const [url, outDir, ...rest] = argv;
  if (!url || !outDir) {
    console.error("usage: node check_training_view.mjs <comfyui-url> <out-dir> [--timeout-s N] [--chromium PATH]");
    process.exit(2);
  }
  const options = { url: url.replace(/\/$/, ""), outDir, timeoutS: 600, chromium: "/usr/bin/chromium" };
  for (let i = 0; i < rest.length; i += 2) {
    if (rest[i] === "--timeout-s") options.timeoutS = Number(rest[i + 1]);
    else if (rest[i] === "--chromium") options.chromium = rest[i + 1];
    else { console.error(`unknown option ${rest[i]}`); process.exit(2); }
  }
  return options;
}

const since = (start) => Number(((Date.now() - start) / 1000).toFixed(2));

async function main() {
  const options = parseArgs(process.argv.slice(2));
  mkdirSync(options.outDir, { recursive: true });
  const started = Date.now();
  const result = { url: options.url, console: [], page_errors: [], timings: {} };
  const save = () => writeFileSync(join(options.outDir, "result.json"), JSON.stringify(result, null, 2));
  const browser = await launchChromium(options.chromium);
  try {
    result.browser_version = browser.version();
    const page = await openComfyPage(browser, options.url, result, { width: 1600, height: 1400 });
    result.timings.page_ready_s = since(started);
    result.extension_registered = await page.evaluate(
      () => window.comfyAPI.app.app.extensions.some((extension) => extension.name === "sfgrpo.TrainingView"));

    // The template, shrunk to test size; loaded twice so that the node's first load already has the test's run_name
    // (a reload refill of an older run of the same name would otherwise be on the chart before training starts).
    const runName = `browser_${Date.now().toString(36)}`;
    result.run_name = runName;
    result.loaded = await page.evaluate(async ({ runName, training, captions }) => {
      const app = window.comfyAPI.app.app;
      const response = await fetch("/api/workflow_templates/sfgrpo/train_lora.json", { cache: "no-store" });
      if (!response.ok) throw new Error(`template: HTTP ${response.status}`);
      await app.loadGraphData(await response.json());
      const set = (node, values) => {
        for (const [name, value] of Object.entries(values)) {
          const widget = node.widgets?.find((candidate) => candidate.name === name);
          if (!widget) throw new Error(`${node.type} has no widget ${name}`);
          widget.value = value;
        }
      };
      const nodes = app.graph._nodes;
      const train = nodes.filter((node) => node.type === "SFGRPOTrainLoRA");
      if (train.length !== 1) throw new Error(`${train.length} Train LoRA nodes`);
      set(train[0], { ...training, run_name: runName });
      // The stock Save LoRA writes under its own prefix too: keep this run's file apart from other tests' runs.
      for (const node of nodes.filter((node) => node.type === "SaveLoRA")) set(node, { prefix: `loras/${runName}` });
      for (const node of nodes.filter((node) => node.type === "SFGRPOMiniWorldPromptList")) set(node, captions);
      await app.loadGraphData(app.graph.serialize());
      return { nodes: app.graph._nodes.length, types: app.graph._nodes.map((node) => node.type) };
    }, { runName, training: SMALL_TRAINING, captions: SMALL_CAPTIONS });
    await page.waitForTimeout(500);
    result.before = await nodeView(page);

    // Queue it and wait for the prompt's end.
    await page.evaluate(() => {
      const { api } = window.comfyAPI.api;
      window.__sfgrpoTest = { events: 0, end: null };
      api.addEventListener("sfgrpo.training", () => { window.__sfgrpoTest.events += 1; });
      for (const kind of ["execution_success", "execution_error", "execution_interrupted"]) {
        api.addEventListener(kind, (event) => { window.__sfgrpoTest.end ??= { kind, detail: event.detail }; });
      }
    });
    const queuedAt = Date.now();
    result.queue = await page.evaluate(async () => {
      const response = await window.comfyAPI.app.app.queuePrompt(0);
      return response === undefined ? null : JSON.parse(JSON.stringify(response));
    });
    await page.waitForFunction(() => window.__sfgrpoTest.end !== null, null,
      { timeout: options.timeoutS * 1000, polling: 250 });
    result.end = await page.evaluate(() => window.__sfgrpoTest);
    result.timings.run_s = since(queuedAt);
    await page.waitForTimeout(800); // the last "executed" messages and a redraw
    result.after = await nodeView(page);
    // What queueing again would send and what saving would write: the view's widgets are in neither.
    result.serialized = await page.evaluate(async () => {
      const app = window.comfyAPI.app.app;
      const node = app.graph._nodes.find((candidate) => candidate.type === "SFGRPOTrainLoRA");
      const { output } = await app.graphToPrompt();
      const saved = app.graph.serialize().nodes.find((candidate) => candidate.id === node.id);
      return { prompt_inputs: Object.keys(output[String(node.id)]?.inputs ?? {}),
               widgets_values: saved.widgets_values };
    });
    save();

    await page.screenshot({ path: join(options.outDir, "page.png") });
    await focusTrainNode(page);
    result.train_node_clip = await trainNodeClip(page);
    if (result.train_node_clip) {
      await page.screenshot({ path: join(options.outDir, "train_node.png"), clip: result.train_node_clip });
    }
    const chart = page.locator(".sfgrpo-training-view").first();
    if (await chart.count()) await chart.screenshot({ path: join(options.outDir, "chart.png") });

    // Reload survival, when the server has the route.
    const route = await fetch(`${options.url}/sfgrpo/training?run_name=${runName}`).catch(() => null);
    result.route_status = route ? route.status : null;
    if (route?.ok) {
      result.route_answer = await route.json();
      await page.reload({ waitUntil: "domcontentloaded" });
      await waitForApp(page);
      await page.waitForFunction(() => window.comfyAPI.app.app.graph._nodes.some(
        (node) => node.type === "SFGRPOTrainLoRA" && node.sfgrpoView), null, { timeout: 20_000 }).catch(() => {});
      await page.waitForTimeout(500);
      result.reloaded = await nodeView(page);
      await focusTrainNode(page);
      const clip = await trainNodeClip(page);
      if (clip) await page.screenshot({ path: join(options.outDir, "reload.png"), clip });
    }
    // A reload in the middle of a run: a new 3-iteration run, the page reloaded after its first event; the chart
    // refills from the route and the run's later events carry on on the same chart.
    if (route?.ok) {
      const midRunName = `${runName}_mid`;
      result.mid_run_name = midRunName;
      await page.evaluate(({ runName, training }) => {
        const app = window.comfyAPI.app.app;
        const node = app.graph._nodes.find((candidate) => candidate.type === "SFGRPOTrainLoRA");
        for (const [name, value] of Object.entries({ ...training, run_name: runName })) {
          node.widgets.find((widget) => widget.name === name).value = value;
        }
        for (const save of app.graph._nodes.filter((candidate) => candidate.type === "SaveLoRA")) {
          save.widgets.find((widget) => widget.name === "prefix").value = `loras/${runName}`;
        }
        window.__sfgrpoMid = { events: 0 };
        window.comfyAPI.api.api.addEventListener("sfgrpo.training", () => { window.__sfgrpoMid.events += 1; });
      }, { runName: midRunName, training: { ...SMALL_TRAINING, iterations: 3 } });
      await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0));
      await page.waitForFunction(() => window.__sfgrpoMid.events >= 1, null,
        { timeout: options.timeoutS * 1000, polling: 100 });
      await page.reload({ waitUntil: "domcontentloaded" });
      await waitForApp(page);
      result.mid_run_reloaded_at = await page.evaluate(async (name) => {
        const answer = await fetch(`/sfgrpo/training?run_name=${name}`).then((response) => response.json());
        return answer.records?.filter((record) => "reward_mean" in record).length ?? 0;
      }, midRunName);
      await page.waitForFunction(() => {
        const node = window.comfyAPI.app.app.graph._nodes.find((candidate) => candidate.type === "SFGRPOTrainLoRA");
        return node?.sfgrpoTraining?.points.length === 3 && /done/.test(node.sfgrpoView?.status.textContent ?? "");
      }, null, { timeout: options.timeoutS * 1000, polling: 250 }).catch(() => {});
      result.mid_run = await nodeView(page);
      await focusTrainNode(page);
      const clip = await trainNodeClip(page);
      if (clip) await page.screenshot({ path: join(options.outDir, "mid_run.png"), clip });
    }
    result.timings.total_s = since(started);
    save();
  } finally {
    await browser.close();
  }
}

/** What the Train LoRA and Score nodes show. */
function nodeView(page) {
  return page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const textOf = (node) => node.widgets?.find((widget) => widget.name === "sfgrpo_text")?.value ?? null;
    const train = app.graph._nodes.find((node) => node.type === "SFGRPOTrainLoRA");
    const view = train?.sfgrpoView;
    const element = view?.element;
    const rect = element?.getBoundingClientRect();
    return {
      chart_widget: Boolean(train?.widgets?.some((widget) => widget.name === "sfgrpo_training_view")),
      chart_points: view ? Number(view.canvas.dataset.points) : 0,
      chart_eval_points: view ? Number(view.canvas.dataset.evalPoints) : 0,
      state_points: train?.sfgrpoTraining?.points ?? [],
      status: view?.status.textContent ?? null,
      chart_in_document: Boolean(element?.isConnected),
      chart_visible: Boolean(rect && rect.width > 0 && rect.height > 0 && getComputedStyle(element).display !== "none"),
      chart_rect: rect ? { x: rect.x, y: rect.y, width: rect.width, height: rect.height } : null,
      chart_canvas_size: view ? [view.canvas.width, view.canvas.height] : null,
      strip_steps: Number(view?.strip?.dataset.steps ?? 0),
      strip_visible: Boolean(view?.strip && view.strip.naturalWidth > 0 && getComputedStyle(view.strip).display !== "none"),
      train_text: train ? textOf(train) : null,
      score_texts: app.graph._nodes.filter((node) => node.type === "SFGRPOScore").map(textOf),
      chromium_widgets: train?.widgets?.map((widget) => widget.name) ?? [],
    };
  });
}

/** Scale 1 with the Train LoRA node clear of the side bar and the workflow menu. */
async function focusTrainNode(page) {
  await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const node = app.graph._nodes.find((candidate) => candidate.type === "SFGRPOTrainLoRA");
    if (!node) return;
    app.canvas.ds.scale = 1;
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    app.canvas.ds.offset[0] = -node.pos[0] + 420;
    app.canvas.ds.offset[1] = -node.pos[1] + title + 110;
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
  });
  await page.waitForTimeout(600); // DOM widgets follow the canvas on the next frames
}

/** The Train LoRA node's box on the page (title included), clipped to the viewport. */
function trainNodeClip(page) {
  return page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    const node = app.graph._nodes.find((candidate) => candidate.type === "SFGRPOTrainLoRA");
    if (!node) return null;
    const canvasRect = app.canvas.canvas.getBoundingClientRect();
    const { scale, offset } = app.canvas.ds;
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const left = canvasRect.left + (node.pos[0] + offset[0]) * scale - 6;
    const top = canvasRect.top + (node.pos[1] - title + offset[1]) * scale - 6;
    const x = Math.max(0, left), y = Math.max(0, top);
    const width = Math.min(window.innerWidth - x, node.size[0] * scale + 12);
    const height = Math.min(window.innerHeight - y, (node.size[1] + title) * scale + 12);
    return width > 0 && height > 0 ? { x, y, width, height } : null;
  });
}

main().catch((error) => {
  console.error(error?.stack ?? String(error));
  process.exit(2);
});
