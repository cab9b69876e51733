// Stepwise-Flow-GRPO: the live training view and the text outputs on the nodes, for ComfyUI's frontend (1.32+).
//
// * Train LoRA (SFGRPOTrainLoRA): each "sfgrpo.training" websocket event {node, prompt_id, record} (sent by the
//   trainer after every iteration, see nodes/train.py TrainingProgress) adds a point to a small chart drawn on the
//   node: train reward mean with a +-std band and the held-out reward, plus a status line (iteration i/N, seconds
//   per iteration, ETA), and under the chart the event's x0-estimate strip: the clean image each denoising step of
//   the iteration's first trajectory points at. Nothing is drawn before the first event. After a page reload the
//   chart refills from GET /sfgrpo/training?run_name=<run_name> (nodes/routes.py) when that route is there; a run
//   still going carries on on the same chart (iterations missed while reloading are fetched again).
// * Score, Train LoRA and Credit Signal (SFGRPOScore, SFGRPOTrainLoRA, SFGRPOCreditSignal): the node's text output
//   (the executed message's "text", ui.PreviewText: scores, the run's summary, the verdict and its table) is shown
//   on the node in a read-only box, as the stock Preview Any node does.
//
// Served by ComfyUI at /extensions/sfgrpo/js/sfgrpo_training_view.js, hence ../../../scripts/ for the frontend's
// module shims.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EVENT = "sfgrpo.training";
const TRAIN_NODE = "SFGRPOTrainLoRA";
const TEXT_NODES = new Set(["SFGRPOScore", TRAIN_NODE, "SFGRPOCreditSignal"]);
const CHART_WIDGET = "sfgrpo_training_view";
const TEXT_WIDGET = "sfgrpo_text";
const CHART_HEIGHT = 200; // the whole view: the chart, the estimate strip (STRIP_HEIGHT) and the status line
const STRIP_HEIGHT = 40;
const DATA_PNG = /^data:image\/png;base64,[A-Za-z0-9+/=]+$/;
const COLORS = { train: "#4aa3ff", band: "rgba(74, 163, 255, 0.22)", eval: "#ffa43a", axis: "#888", text: "#ddd" };

const finite = (value) => typeof value === "number" && Number.isFinite(value);

function formatSeconds(seconds) {
  if (!finite(seconds) || seconds < 0) return "?";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m ${String(Math.round(seconds % 60)).padStart(2, "0")}s`;
  return `${Math.floor(minutes / 60)}h ${String(minutes % 60).padStart(2, "0")}m`;
}

function widgetValue(node, name) {
  return node.widgets?.find((widget) => widget.name === name)?.value;
}

/** The node an event names: its id in the open graph, else (subgraphs, ids "a:b") the only Train LoRA node. */
function findTrainNode(nodeId) {
  const graph = app.graph;
  if (!graph) return null;
  const id = String(nodeId ?? "");
  const candidates = [id, id.split(":").pop()];
  for (const candidate of candidates) {
    const node = graph.getNodeById?.(candidate) ?? graph.getNodeById?.(Number(candidate));
    if (node && (node.comfyClass ?? node.type) === TRAIN_NODE) return node;
  }
  const trainNodes = (graph._nodes ?? graph.nodes ?? []).filter((node) => (node.comfyClass ?? node.type) === TRAIN_NODE);
  return trainNodes.length === 1 ? trainNodes[0] : null;
}

/** The run's points and timing, kept on the node (not serialized). */
class TrainingState {
  constructor() {
    this.promptId = null;
    this.points = []; // {iteration, reward_mean, reward_std, eval_reward_mean}
    this.arrivals = []; // performance.now() of each live point, for seconds per iteration
    this.total = null; // iterations of the run
    this.lastElapsed = null; // the record's seconds_elapsed (training time, no evaluation)
    this.source = "live";
    this.estimates = null; // {png: data URL, steps, iteration} of the latest event
  }

  reset(promptId, source = "live") {
    this.promptId = promptId;
    this.points = [];
    this.estimates = null;
    this.arrivals = [];
    this.lastElapsed = null;
    this.source = source;
  }

  add(record, now) {
    if (!record || !finite(record.iteration)) return false;
    // A new run (or a resumed one) starts over where its iterations go back.
    const last = this.points[this.points.length - 1];
    if (last && record.iteration <= last.iteration) {
      this.points = this.points.filter((point) => point.iteration < record.iteration);
      this.arrivals = [];
    }
    this.points.push(TrainingState.point(record));
    if (now !== undefined) this.arrivals.push(now);
    if (finite(record.seconds_elapsed)) this.lastElapsed = record.seconds_elapsed;
    return true;
  }

  /** The records of iterations before the last point that the chart lacks (a page reloaded mid-run: events it
   *  missed, or that came before the refill); returns whether any was added. */
  merge(records) {
    const have = new Set(this.points.map((point) => point.iteration));
    const last = this.points.length ? this.points[this.points.length - 1].iteration : Infinity;
    const missing = records.filter((record) => finite(record.iteration) && !have.has(record.iteration) &&
      record.iteration < last);
    if (!missing.length) return false;
    this.points = [...this.points, ...missing.map(TrainingState.point)].sort((a, b) => a.iteration - b.iteration);
    return true;
  }

  static point(record) {
    return {
      iteration: record.iteration,
      reward_mean: finite(record.reward_mean) ? record.reward_mean : null,
      reward_std: finite(record.reward_std) ? record.reward_std : null,
      eval_reward_mean: finite(record.eval_reward_mean) ? record.eval_reward_mean : null,
    };
  }

  secondsPerIteration() {
    if (this.arrivals.length >= 2) {
      const span = (this.arrivals[this.arrivals.length - 1] - this.arrivals[0]) / 1000;
      return span / (this.arrivals.length - 1);
    }
    const last = this.points[this.points.length - 1];
    return last && finite(this.lastElapsed) ? this.lastElapsed / (last.iteration + 1) : null;
  }

  status() {
    const last = this.points[this.points.length - 1];
    if (!last) return "";
    const done = last.iteration + 1;
    const total = finite(this.total) ? this.total : null;
    const perIteration = this.secondsPerIteration();
    const parts = [`iteration ${done}/${total ?? "?"}`];
    if (finite(perIteration)) parts.push(`${perIteration.toFixed(perIteration < 10 ? 2 : 1)} s/it`);
    if (total !== null && done >= total) parts.push(this.source === "live" ? "done" : "finished run");
    else if (total !== null && finite(perIteration)) parts.push(`ETA ${formatSeconds(perIteration * (total - done))}`);
    if (finite(last.reward_mean)) {
      parts.push(`reward ${last.reward_mean.toFixed(3)}` + (finite(last.reward_std) ? ` ± ${last.reward_std.toFixed(3)}` : ""));
    }
    const evals = this.points.filter((point) => finite(point.eval_reward_mean));
    if (evals.length) parts.push(`held-out ${evals[evals.length - 1].eval_reward_mean.toFixed(3)}`);
    return parts.join(" · ");
  }
}

function drawChart(canvas, state) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(canvas.clientWidth, 50);
  const height = Math.max(canvas.clientHeight, 40);
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const points = state.points;
  canvas.dataset.points = String(points.length);
  canvas.dataset.evalPoints = String(points.filter((point) => finite(point.eval_reward_mean)).length);
  if (!points.length) return;

  const values = [];
  for (const point of points) {
    if (finite(point.reward_mean)) {
      const std = finite(point.reward_std) ? point.reward_std : 0;
      values.push(point.reward_mean - std, point.reward_mean + std);
    }
    if (finite(point.eval_reward_mean)) values.push(point.eval_reward_mean);
  }
  let low = values.length ? Math.min(...values) : 0;
  let high = values.length ? Math.max(...values) : 1;
  if (high - low < 1e-6) { low -= 0.5; high += 0.5; }
  const pad = (high - low) * 0.08;
  low -= pad; high += pad;
  const first = points[0].iteration;
  const lastIteration = Math.max(points[points.length - 1].iteration, finite(state.total) ? state.total - 1 : 0);
  const left = 38, right = 8, top = 16, bottom = 16;
  const x = (iteration) => left + (lastIteration > first ? (iteration - first) / (lastIteration - first) : 0.5) * (width - left - right);
  const y = (value) => top + (1 - (value - low) / (high - low)) * (height - top - bottom);

  ctx.font = "10px sans-serif";
  ctx.strokeStyle = COLORS.axis;
  ctx.fillStyle = COLORS.axis;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(left, top); ctx.lineTo(left, height - bottom); ctx.lineTo(width - right, height - bottom);
  ctx.stroke();
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (const value of [low + pad, high - pad]) ctx.fillText(value.toFixed(2), left - 3, y(value));
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  ctx.fillText(String(first), x(first), height - bottom + 2);
  if (lastIteration > first) ctx.fillText(String(lastIteration), x(lastIteration), height - bottom + 2);

  const train = points.filter((point) => finite(point.reward_mean));
  if (train.length) {
    const std = (point) => (finite(point.reward_std) ? point.reward_std : 0);
    ctx.fillStyle = COLORS.band;
    ctx.beginPath();
    train.forEach((point, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(point.iteration), y(point.reward_mean + std(point))));
    [...train].reverse().forEach((point) => ctx.lineTo(x(point.iteration), y(point.reward_mean - std(point))));
    ctx.closePath();
    if (train.length === 1) ctx.fillRect(x(train[0].iteration) - 3, y(train[0].reward_mean + std(train[0])), 6,
                                         y(train[0].reward_mean - std(train[0])) - y(train[0].reward_mean + std(train[0])));
    else ctx.fill();
    series(ctx, train.map((point) => [x(point.iteration), y(point.reward_mean)]), COLORS.train);
  }
  const evals = points.filter((point) => finite(point.eval_reward_mean));
  if (evals.length) series(ctx, evals.map((point) => [x(point.iteration), y(point.eval_reward_mean)]), COLORS.eval);

  ctx.textAlign = "left"; ctx.textBaseline = "top";
  ctx.fillStyle = COLORS.train; ctx.fillText("■ train reward ± std", left + 4, 2);
  ctx.fillStyle = COLORS.eval; ctx.fillText("■ held-out", left + 120, 2);
}

function series(ctx, xy, color) {
  ctx.strokeStyle = color;
  ctx.fillStyle = color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  xy.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
  ctx.stroke();
  for (const [px, py] of xy) {
    ctx.beginPath();
    ctx.arc(px, py, 2.5, 0, Math.PI * 2);
    ctx.fill();
  }
}

/** The chart widget of a Train LoRA node, made on first use. */
function chartView(node) {
  if (node.sfgrpoView) return node.sfgrpoView;
  const element = document.createElement("div");
  element.className = "sfgrpo-training-view";
  element.style.cssText = "display:flex;flex-direction:column;width:100%;height:100%;box-sizing:border-box;" +
    "background:rgba(0,0,0,0.25);border-radius:4px;padding:2px 4px;overflow:hidden;pointer-events:none;";
  const canvas = document.createElement("canvas");
  canvas.className = "sfgrpo-training-chart";
  canvas.style.cssText = "flex:1 1 auto;width:100%;min-height:0;";
  canvas.dataset.points = "0";
  const strip = document.createElement("img");
  strip.className = "sfgrpo-training-estimates";
  strip.alt = "x0 estimates";
  strip.style.cssText = `flex:0 0 ${STRIP_HEIGHT}px;height:${STRIP_HEIGHT}px;max-width:100%;object-fit:contain;` +
    "object-position:left center;image-rendering:pixelated;display:none;margin:2px 0;";
  const status = document.createElement("div");
  status.className = "sfgrpo-training-status";
  status.style.cssText = `flex:0 0 auto;font:11px sans-serif;color:${COLORS.text};white-space:nowrap;` +
    "overflow:hidden;text-overflow:ellipsis;";
  element.append(canvas, strip, status);
  const widget = node.addDOMWidget(CHART_WIDGET, "sfgrpo_chart", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => CHART_HEIGHT,
    getHeight: () => CHART_HEIGHT,
  });
  widget.serialize = false;
  widget.serializeValue = () => undefined;
  const view = { widget, element, canvas, strip, status, state: node.sfgrpoTraining };
  view.redraw = () => {
    try {
      view.state.total = widgetValue(node, "iterations") ?? view.state.total;
      drawChart(canvas, view.state);
      const estimates = view.state.estimates;
      if (estimates && strip.dataset.src !== estimates.png) {
        strip.src = strip.dataset.src = estimates.png;
        strip.title = `x0 estimates of iteration ${estimates.iteration + 1}, steps 1 to ${estimates.steps}`;
        strip.dataset.steps = String(estimates.steps);
      }
      strip.style.display = estimates ? "block" : "none";
      status.textContent = view.state.status();
      element.dataset.status = status.textContent;
    } catch (error) {
      console.debug("[sfgrpo] training view: could not draw", error);
    }
  };
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => view.redraw()).observe(canvas);
  node.sfgrpoView = view;
  const [width, height] = node.size;
  const wanted = node.computeSize?.() ?? [width, height];
  node.setSize?.([Math.max(width, wanted[0], 320), Math.max(height, wanted[1])]);
  node.setDirtyCanvas?.(true, true);
  return view;
}

function trainingState(node) {
  node.sfgrpoTraining ??= new TrainingState();
  return node.sfgrpoTraining;
}

function onTrainingEvent(event) {
  const detail = event?.detail;
  if (!detail || typeof detail !== "object") return;
  const node = findTrainNode(detail.node);
  if (!node) return;
  const state = trainingState(node);
  if (detail.prompt_id && detail.prompt_id !== state.promptId) {
    // The run the chart was refilled with after a reload, going on: keep its points. Anything else: a new run.
    const last = state.points[state.points.length - 1];
    const continues = state.source === "reloaded" && state.promptId === null && last &&
      detail.record?.iteration > last.iteration;
    if (continues) {
      state.promptId = detail.prompt_id;
      state.source = "live";
    } else {
      state.reset(detail.prompt_id);
    }
  }
  const gap = state.points.length && detail.record?.iteration > state.points[state.points.length - 1].iteration + 1;
  if (!state.add(detail.record, performance.now())) return;
  if (gap) refill(node).catch(() => {}); // events missed while the page reloaded: the route has them
  const estimates = detail.estimates;
  if (estimates && typeof estimates.png === "string" && DATA_PNG.test(estimates.png) && finite(estimates.steps)) {
    state.estimates = { png: estimates.png, steps: estimates.steps, iteration: detail.record.iteration };
  }
  const view = chartView(node);
  view.state = state;
  view.redraw();
}

/** After a page reload: refill the chart from the newest run of the node's run_name (GET /sfgrpo/training). */
async function refill(node) {
  const runName = widgetValue(node, "run_name");
  if (!runName || node.sfgrpoTraining?.source === "reloaded") return;
  let response;
  try {
    response = await api.fetchApi(`/sfgrpo/training?run_name=${encodeURIComponent(runName)}`, { cache: "no-store" });
  } catch {
    return; // no route (older pack) or the server is away: nothing to show
  }
  if (!response?.ok) return;
  const data = await response.json().catch(() => null);
  if (!data || !Array.isArray(data.records) || !data.records.length) return;
  const records = data.records.filter((record) => "reward_mean" in record);
  const state = trainingState(node);
  if (state.points.length) {
    // Live events of the run got here first, or some were missed while the page reloaded: fill in the rest.
    if (!state.merge(records)) return;
  } else {
    state.reset(null, "reloaded");
    for (const record of records) state.add(record);
    if (!state.points.length) return;
  }
  if (finite(data.iterations)) state.total = data.iterations;
  const view = chartView(node);
  view.state = state;
  view.redraw();
}

/** The read-only text box of a Score or Train LoRA node, made on first use. */
function textWidget(node) {
  let widget = node.widgets?.find((candidate) => candidate.name === TEXT_WIDGET);
  if (widget) return widget;
  const textarea = document.createElement("textarea");
  textarea.className = "comfy-multiline-input sfgrpo-text-output";
  textarea.readOnly = true;
  textarea.spellcheck = false;
  textarea.style.cssText = "width:100%;height:100%;box-sizing:border-box;resize:none;opacity:0.85;" +
    "font:11px monospace;white-space:pre-wrap;overflow-wrap:anywhere;overflow:auto;";
  // Wheel and middle-button drags over the box still move the canvas.
  textarea.addEventListener("wheel", (event) => {
    if (textarea.scrollHeight <= textarea.clientHeight) app.canvas?.processMouseWheel?.(event);
  });
  widget = node.addDOMWidget(TEXT_WIDGET, "sfgrpo_text", textarea, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => textarea.value,
    setValue: (value) => { textarea.value = value ?? ""; },
    // Room for the text's lines, up to 12 (more scroll).
    getMinHeight: () => Math.min(Math.max(textarea.value.split("\n").length, 3), 12) * 14 + 12,
  });
  widget.serialize = false;
  widget.inputEl = textarea;
  return widget;
}

function showText(node, message) {
  const text = message?.text;
  if (text === undefined || text === null) return;
  const value = Array.isArray(text) ? text.join("\n") : String(text);
  const fresh = !node.widgets?.some((candidate) => candidate.name === TEXT_WIDGET);
  const widget = textWidget(node);
  widget.value = value;
  widget.inputEl.value = value;
  if (fresh) {
    const [width, height] = node.size;
    const wanted = node.computeSize?.() ?? [width, height];
    node.setSize?.([Math.max(width, wanted[0], 360), Math.max(height, wanted[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "sfgrpo.TrainingView",

  async setup() {
    api.addEventListener(EVENT, onTrainingEvent);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData?.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      try {
        showText(this, message);
        if (nodeData.name === TRAIN_NODE) this.sfgrpoView?.redraw();
      } catch (error) {
        console.debug("[sfgrpo] could not show the node's text output", error);
      }
      return result;
    };
  },

  async loadedGraphNode(node) {
    if ((node.comfyClass ?? node.type) === TRAIN_NODE) refill(node).catch(() => {});
  },
});
