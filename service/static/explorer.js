// dymu preference explorer (docs/explorer.md). A plain ES module with no dependencies: it talks
// only to the server that served it (GET /readyz, GET /v1/model, POST /preference,
// GET /v1/cost-map, POST /predict) and renders what those return; it computes no costs itself.

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------ small helpers
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function s(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));
const fmtInt = (n) => Number(n).toLocaleString("en-US");
const fmtG = (g) => (g >= 100 ? g.toFixed(1) : Number(g).toPrecision(4));
const fmtMs = (ms) => `${Number(ms).toFixed(1)} ms`;
const pct = (x) => `${(100 * x).toFixed(1)} %`;
const fmtR = (r) => `(${r.map((v) => v.toFixed(2)).join(", ")})`;

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

class ApiError extends Error {
  constructor(status, code, detail) {
    super(`${status} ${code}: ${detail}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

/** fetch + JSON + the service's error body ({error, detail, status}) as an ApiError. */
async function api(path, init) {
  const t0 = performance.now();
  const res = await fetch(path, init);
  const isJson = (res.headers.get("content-type") || "").includes("json");
  const body = isJson ? await res.json() : await res.text();
  const ms = performance.now() - t0;
  if (!res.ok) {
    const detail = isJson ? body.detail : String(body).slice(0, 200);
    throw new ApiError(res.status, isJson ? body.error : "http_error", detail);
  }
  return { body, ms };
}

// --------------------------------------------------------------------------------- colours
const TASK_COLORS = ["#2454d3", "#d9480f", "#2b8a3e", "#ae3ec9", "#e67700", "#0c8599",
  "#c2255c", "#5c940d", "#495057", "#1864ab"];
const SEG_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
  "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"];
// viridis at 9 stops (matplotlib's): perceptually uniform, readable in grey
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779",
  "#6ece58", "#fde725"].map(hexRgb);

function hexRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function hslRgb(hue, sat, light) {
  const f = (n) => {
    const k = (n + hue / 30) % 12;
    const a = sat * Math.min(light, 1 - light);
    return Math.round(255 * (light - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

function cycleColor(list, i) {
  return i < list.length ? hexRgb(list[i]) : hslRgb((i * 137.508) % 360, 0.6, 0.5);
}
const taskColor = (j) => `rgb(${cycleColor(TASK_COLORS, j).join(" ")})`;
const segColor = (k) => cycleColor(SEG_COLORS, k);

function viridis(t) {
  const x = clamp(t, 0, 1) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}

function drawColorbar(canvas) {
  const ctx = canvas.getContext("2d");
  for (let x = 0; x < canvas.width; x++) {
    ctx.fillStyle = `rgb(${viridis(x / (canvas.width - 1)).join(" ")})`;
    ctx.fillRect(x, 0, 1, canvas.height);
  }
}

// ------------------------------------------------------------------- the 3-task simplex geometry
// One equilateral triangle shared by the picker (SVG) and the cost map (canvas): corner i is
// task i, and r is the point's barycentric coordinates.
const TRI = {
  w: 300,
  h: 270,
  v: [[150, 24], [22, 245.7], [278, 245.7]],
  point(r) {
    return [0, 1].map((k) => this.v.reduce((acc, v, i) => acc + r[i] * v[k], 0));
  },
  barycentric(x, y) {
    const [[x0, y0], [x1, y1], [x2, y2]] = this.v;
    const det = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2);
    const l0 = ((y1 - y2) * (x - x2) + (x2 - x1) * (y - y2)) / det;
    const l1 = ((y2 - y0) * (x - x2) + (x0 - x2) * (y - y2)) / det;
    return [l0, l1, 1 - l0 - l1];
  },
  /** r of the triangle's point nearest to (x, y): inside it is the point itself. */
  rAt(x, y) {
    let b = this.barycentric(x, y);
    if (Math.min(...b) < 0) {
      let best = null;
      for (const [i, j] of [[0, 1], [1, 2], [2, 0]]) {
        const [a, c] = [this.v[i], this.v[j]];
        const [dx, dy] = [c[0] - a[0], c[1] - a[1]];
        const t = clamp(((x - a[0]) * dx + (y - a[1]) * dy) / (dx * dx + dy * dy), 0, 1);
        const p = [a[0] + t * dx, a[1] + t * dy];
        const d = (p[0] - x) ** 2 + (p[1] - y) ** 2;
        if (!best || d < best.d) best = { d, p };
      }
      b = this.barycentric(...best.p);
    }
    return b.map((v) => Math.max(0, v));
  },
};

/** The grid point {k / res} nearest to r, as the integers k (largest-remainder rounding). */
function gridUnits(r, res) {
  const sum = r.reduce((a, v) => a + v, 0);
  const raw = r.map((v) => (v / sum) * res);
  const k = raw.map(Math.floor);
  const left = res - k.reduce((a, v) => a + v, 0);
  const order = raw.map((v, i) => [v - Math.floor(v), i]).sort((a, b) => b[0] - a[0]);
  for (let n = 0; n < left; n++) k[order[n][1]] += 1;
  return k;
}

const gridKey = (r, res) => gridUnits(r, res).join(",");

// The page keeps r in steps of 1e-4 that sum to exactly 1: what it shows is what it posts.
const R_STEPS = 10000;
const quantize = (r) => gridUnits(r, R_STEPS).map((k) => k / R_STEPS);

function binom(n, k) {
  let out = 1;
  for (let i = 1; i <= k; i++) out = (out * (n - k + i)) / i;
  return Math.round(out);
}

// ------------------------------------------------------------------------------------ state
const state = {
  model: null,
  tasks: [],
  r: [],
  c: 0,
  budget: null, // GFLOPs when a budget chooses c (POST /preference with "budget")
  subset: new Set(),
  record: null,
  roundTripMs: 0,
  seq: 0,
  // A typed (or URL) r whose answer has not come yet: a c change meanwhile must carry it, or
  // the newer request (with the old r) would win and the typed r would be lost.
  typedR: null,
  costMaps: new Map(),
  costMap: null,
  costImage: null,
  costSeq: 0,
  image: null,
  imageName: "",
  imageUrl: null,
  predicted: false,
  predictSeq: 0,
  compare: { A: null, B: null },
};

const N = () => state.tasks.length;
const subsetIdx = () => state.tasks.map((_, j) => j).filter((j) => state.subset.has(j));
const allSelected = () => state.subset.size === N();

function setStatus(text) {
  $("status").textContent = text;
}

// An error remembers what raised it: a request that succeeds later clears a request's error,
// never the answer to a user's own action (e.g. refusing to uncheck the last task), which a
// reply still in flight from before that action would otherwise wipe.
function showError(err, source = "request") {
  const box = $("error");
  box.textContent = err instanceof ApiError ? `${err.detail} (${err.code}, ${err.status})` : String(err);
  box.dataset.source = source;
  box.hidden = false;
}

function clearError(source = "request") {
  const box = $("error");
  if (source !== "any" && box.dataset.source && box.dataset.source !== source) return;
  box.hidden = true;
  box.textContent = "";
  delete box.dataset.source;
}

// ------------------------------------------------------------------------------ start-up
async function waitReady() {
  for (;;) {
    try {
      const res = await fetch("/readyz");
      const body = await res.json();
      if (res.ok && body.ready) return;
      setStatus(`waiting for the model: ${body.status}${body.detail ? ` (${body.detail})` : ""}`);
    } catch {
      setStatus("waiting for the server…");
    }
    await new Promise((done) => setTimeout(done, 500));
  }
}

async function init() {
  await waitReady();
  const { body: model } = await api("/v1/model");
  state.model = model;
  state.tasks = model.tasks.map((t) => t.name);
  state.subset = new Set(state.tasks.map((_, j) => j));
  state.r = state.tasks.map(() => 1 / N());
  $("model-line").textContent = `${model.name ?? "model"} ${model.version ?? ""} · ` +
    `${N()} tasks (${state.tasks.join(", ")}) · ${model.n_layers} layers · ` +
    `input ${model.input_size.join("×")} · anchor ${fmtG(model.anchor_cost.gflops)} GFLOPs · ` +
    `${model.device}, ${model.backend}`;
  buildControls();
  const fromHash = readHash();
  syncControls();
  drawColorbar($("costmap-bar"));
  await loadSample(false);
  document.body.dataset.ready = "true";
  setStatus("ready");
  await applyPreference(fromHash);
  loadCostMap();
}

// ------------------------------------------------------------------------------- controls
function buildControls() {
  const sliders = $("r-sliders");
  state.tasks.forEach((task, j) => {
    const id = `r-slider-${j}`;
    const input = h("input", {
      id, type: "range", min: 0, max: 1, step: 0.01, value: state.r[j],
      "data-task": task, "aria-describedby": "pref-hint",
      oninput: (e) => setWeight(j, Number(e.target.value)),
    });
    sliders.append(h("div", { class: "slider-row" },
      h("label", { for: id }, h("span", { class: "swatch", "data-color": j }), task),
      input,
      h("output", { id: `${id}-value`, for: id, text: state.r[j].toFixed(2) })));
  });
  for (const sw of sliders.querySelectorAll(".swatch")) {
    sw.style.background = taskColor(Number(sw.dataset.color));
  }
  if (N() === 3) buildPicker();
  else {
    $("pref-hint").textContent = "Set the sliders (moving one rescales the others, so r stays " +
      "on the simplex), or type the weights.";
  }

  $("r-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("r-text").value.trim();
    const values = text.split(/[\s,;]+/).filter(Boolean).map(Number);
    // the server validates and normalizes: the page adopts the r it answers with
    applyPreference(values.length ? values : text);
  });
  const readBudget = () => {
    const on = $("budget-on").checked;
    const value = Number($("budget-gflops").value);
    $("budget-gflops").disabled = !on;
    $("c-slider").disabled = on;
    state.budget = on ? value : null;
    if (!on) $("budget-chosen").textContent = "";
    schedulePreference();
  };
  $("budget-on").addEventListener("change", readBudget);
  $("budget-gflops").addEventListener("input", readBudget);
  $("c-slider").addEventListener("input", (e) => {
    state.c = Number(e.target.value);
    syncControls();
    schedulePreference();
    scheduleCostMap();
  });

  const subset = $("task-subset");
  state.tasks.forEach((task, j) => {
    subset.append(h("label", { class: "inline" },
      h("input", {
        type: "checkbox", checked: true, "data-task": task, name: "tasks", value: task,
        onchange: (e) => toggleTask(j, e.target),
      }),
      h("span", { class: "swatch", "data-color": j }), task));
  });
  for (const sw of subset.querySelectorAll(".swatch")) {
    sw.style.background = taskColor(Number(sw.dataset.color));
  }

  $("image-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) setImage(file, file.name);
  });
  $("sample-btn").addEventListener("click", () => loadSample(true));
  $("predict-btn").addEventListener("click", () => predictCurrent());
  $("set-a").addEventListener("click", () => keepForCompare("A"));
  $("set-b").addEventListener("click", () => keepForCompare("B"));
  $("compare-btn").addEventListener("click", () => runCompare());
}

function buildPicker() {
  const box = $("picker");
  box.hidden = false;
  const svg = s("svg", {
    viewBox: `0 0 ${TRI.w} ${TRI.h}`, role: "group", "aria-labelledby": "picker-title",
  });
  svg.append(s("title", { id: "picker-title" }, "r on the simplex"));
  const [a, b, c] = TRI.v;
  svg.append(s("polygon", {
    points: TRI.v.map((p) => p.join(",")).join(" "), fill: "#eef2fb", stroke: "#9aa6bd",
  }));
  for (let k = 1; k < 5; k++) { // grid lines at r_i = 0.2, 0.4, ...
    const t = k / 5;
    for (const [p, q, o] of [[a, b, c], [b, c, a], [c, a, b]]) {
      const from = p.map((v, i) => v + t * (o[i] - p[i]));
      const to = q.map((v, i) => v + t * (o[i] - q[i]));
      svg.append(s("line", {
        x1: from[0], y1: from[1], x2: to[0], y2: to[1], stroke: "#d5dbe7", "stroke-width": 0.8,
      }));
    }
  }
  const anchors = [["middle", 0, -10], ["start", -18, 18], ["end", 18, 18]];
  TRI.v.forEach(([x, y], j) => {
    const [anchor, dx, dy] = anchors[j];
    svg.append(s("text", {
      x: x + dx, y: y + dy, "text-anchor": anchor, "font-size": 13, fill: taskColor(j),
      "font-weight": 600,
    }, state.tasks[j]));
  });
  const handle = s("circle", {
    id: "picker-handle", class: "handle", r: 9, fill: "#1b2130", stroke: "#fff",
    "stroke-width": 3, tabindex: 0, role: "slider", "aria-roledescription": "2-D slider",
    "aria-label": "preference point r: drag it, or move it with the arrow keys",
    "aria-valuemin": 0, "aria-valuemax": 1, "data-testid": "picker-handle",
  });
  svg.append(handle);
  box.append(svg);

  const toSvg = (e) => {
    const p = new DOMPoint(e.clientX, e.clientY).matrixTransform(svg.getScreenCTM().inverse());
    return [p.x, p.y];
  };
  svg.addEventListener("pointerdown", (e) => {
    svg.setPointerCapture(e.pointerId);
    handle.focus();
    setR(TRI.rAt(...toSvg(e)));
  });
  svg.addEventListener("pointermove", (e) => {
    if (svg.hasPointerCapture(e.pointerId)) setR(TRI.rAt(...toSvg(e)));
  });
  handle.addEventListener("keydown", (e) => {
    const step = e.shiftKey ? 20 : 4; // SVG units: 1.6 % (Shift: 8 %) of a side
    const move = { ArrowUp: [0, -step], ArrowDown: [0, step], ArrowLeft: [-step, 0],
      ArrowRight: [step, 0] }[e.key];
    if (!move) return;
    e.preventDefault();
    const [x, y] = TRI.point(state.r);
    setR(TRI.rAt(x + move[0], y + move[1]));
  });
}

/** Slider j to v; the other weights are rescaled so that r stays on the simplex. */
function setWeight(j, v) {
  const r = state.r.slice();
  const rest = r.reduce((acc, x, i) => (i === j ? acc : acc + x), 0);
  for (let i = 0; i < r.length; i++) {
    if (i === j) continue;
    r[i] = rest > 1e-9 ? (r[i] * (1 - v)) / rest : (1 - v) / (r.length - 1);
  }
  r[j] = v;
  setR(r);
}

function setR(r) {
  state.typedR = null; // the user moved r since: that wins over a pending typed one
  state.r = quantize(r);
  syncControls();
  schedulePreference();
}

function syncControls() {
  state.r.forEach((v, j) => {
    const slider = $(`r-slider-${j}`);
    if (slider && document.activeElement !== slider) slider.value = v;
    const out = $(`r-slider-${j}-value`);
    if (out) out.textContent = v.toFixed(2);
  });
  // a field being typed into keeps its text until it is submitted
  if (document.activeElement !== $("r-text")) showRText();
  $("c-slider").value = state.c;
  $("c-value").textContent = state.c.toFixed(2);
  const handle = $("picker-handle");
  if (handle) {
    const [x, y] = TRI.point(state.r);
    handle.setAttribute("cx", x);
    handle.setAttribute("cy", y);
    handle.setAttribute("aria-valuenow", state.r[0].toFixed(2));
    handle.setAttribute("aria-valuetext",
      state.tasks.map((t, j) => `${t} ${state.r[j].toFixed(2)}`).join(", "));
  }
  drawCostMap();
}

function showRText() {
  $("r-text").value = state.r.map((v) => +v.toFixed(6)).join(", ");
}

function toggleTask(j, box) {
  if (!box.checked && state.subset.size === 1) {
    box.checked = true;
    showError("at least one task must run", "subset");
    return;
  }
  if (box.checked) state.subset.add(j);
  else state.subset.delete(j);
  clearError("any");
  if (state.budget !== null) schedulePreference(); // a budget is for the tasks that run
  writeHash();
  if (state.record) renderTree($("tree"), state.record.architecture, { legend: $("tree-legend") });
  scheduleCostMap();
  if (state.predicted && $("auto-predict").checked) predictCurrent();
}

// ------------------------------------------------------------------------- URL hash state
function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const c = Number(params.get("c"));
  if (params.has("c") && Number.isFinite(c)) state.c = clamp(c, 0, 1);
  const tasks = (params.get("tasks") || "").split(",").filter((t) => state.tasks.includes(t));
  if (tasks.length) {
    state.subset = new Set(tasks.map((t) => state.tasks.indexOf(t)));
    for (const box of document.querySelectorAll("#task-subset input")) {
      box.checked = tasks.includes(box.dataset.task);
    }
  }
  const r = (params.get("r") || "").split(",").filter(Boolean).map(Number);
  return r.length === N() ? r : null;
}

function writeHash() {
  const parts = [`r=${state.r.map((v) => +v.toFixed(6)).join(",")}`, `c=${state.c}`];
  if (!allSelected()) parts.push(`tasks=${subsetIdx().map((j) => state.tasks[j]).join(",")}`);
  history.replaceState(null, "", `#${parts.join("&")}`);
}

// ------------------------------------------------------------------------- the preference
async function postPreference(r, c) {
  const body = { r };
  if (state.budget === null) body.c = c;
  else {
    body.budget = { max_gflops: state.budget }; // the server chooses c (docs/explorer.md)
    if (!allSelected()) body.tasks = subsetIdx().map((j) => state.tasks[j]);
  }
  return api("/preference", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
}

const schedulePreference = debounce(() => applyPreference(null), 150);

/** POST /preference for the current (r, c), or for a raw r to adopt (typed or from the URL). */
async function applyPreference(rawR) {
  const seq = ++state.seq;
  if (rawR !== null) state.typedR = rawR;
  const adopting = state.typedR;
  document.body.dataset.pending = "true";
  try {
    const { body, ms } = await postPreference(adopting ?? state.r, state.c);
    if (seq !== state.seq) return; // a newer preference is on its way
    clearError();
    $("r-text").removeAttribute("aria-invalid");
    state.record = body;
    state.roundTripMs = ms;
    if (adopting !== null) {
      state.typedR = null;
      state.r = body.r;
      syncControls();
      showRText(); // the normalized r replaces what was typed
    }
    if (body.budget) { // the budget chose c: the slider, the hash and the cost map follow it
      state.c = body.c;
      syncControls();
      scheduleCostMap();
      const chosen = $("budget-chosen");
      chosen.textContent = `chosen c ${body.c.toFixed(4)}: ${fmtG(body.budget.cost.gflops)} ` +
        `GFLOPs for ${body.budget.tasks.join(", ")}`;
      chosen.dataset.c = body.c;
      chosen.dataset.flops = body.budget.cost.flops;
    }
    renderRecord(body, ms);
    writeHash();
    if (state.predicted && $("auto-predict").checked) predictCurrent();
  } catch (err) {
    if (seq !== state.seq) return;
    if (adopting !== null) {
      state.typedR = null;
      $("r-text").setAttribute("aria-invalid", "true");
    }
    showError(err);
  } finally {
    if (seq === state.seq) document.body.dataset.pending = "false";
  }
}

function renderRecord(rec, ms) {
  const cost = rec.cost;
  const rc = $("stat-rc");
  rc.textContent = `r ${fmtR(rec.r)}, c ${rec.c.toFixed(2)}`;
  rc.dataset.r = JSON.stringify(rec.r);
  rc.dataset.c = rec.c;
  $("stat-gflops").textContent = fmtG(cost.gflops);
  const flops = $("stat-flops");
  flops.textContent = `(${fmtInt(cost.flops)} FLOPs at ${cost.input_size.join("×")})`;
  flops.dataset.value = cost.flops;
  $("stat-fraction").textContent =
    `${pct(cost.fraction_of_anchor_flops)} of its FLOPs, ${pct(cost.fraction_of_anchor_params)} of its params`;
  $("stat-params").textContent = `${fmtInt(cost.params)} of ${fmtInt(cost.anchor_params)}`;
  $("stat-params").dataset.value = cost.params;
  const arch = rec.architecture;
  $("stat-nodes").textContent = `${arch.n_used_nodes} of ${arch.n_nodes}`;
  const cache = $("stat-cache");
  cache.textContent = rec.cached ? "hit" : `miss: computed in ${fmtMs(rec.compute_ms)}`;
  cache.dataset.cached = rec.cached;
  $("stat-switch").textContent = `${fmtMs(rec.elapsed_ms)} in the server, ${fmtMs(ms)} round trip`;
  $("arch-id").textContent = arch.id;
  $("pref-id").textContent = rec.preference_id;
  renderTree($("tree"), arch, { legend: $("tree-legend") });
  drawCostMap();
}

// ------------------------------------------------------------------------ the tree diagram
/** Heads whose path runs through each node: count[l][j] (the paths of the selected tasks). */
function pathCounts(arch, heads) {
  const L = arch.n_layers;
  const count = Array.from({ length: L }, () => new Array(arch.n_tasks).fill(0));
  for (const t of heads) {
    let j = t;
    for (let l = L - 1; l >= 0; l--) {
      count[l][j] += 1;
      if (l > 0) j = arch.parents[l - 1][j];
    }
  }
  return count;
}

function renderTree(container, arch, { legend = null, compact = false } = {}) {
  const n = arch.n_tasks;
  const L = arch.n_layers;
  const heads = subsetIdx();
  const count = pathCounts(arch, heads);
  const colW = 74;
  const rowH = compact ? 40 : 46;
  const W = n * colW + 20;
  const H = (L + 1) * rowH + 30;
  const x = (j) => 10 + j * colW + colW / 2;
  const y = (l) => 18 + (L - l) * rowH; // layer L = the heads' row, -1 = the image
  const titleId = `${container.id || "tree"}-title`;
  const svg = s("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": titleId, "data-architecture": arch.id,
  });
  const lines = [];
  for (let l = 0; l < L; l++) {
    const used = count[l].map((k, j) => [k, j]).filter(([k]) => k > 0);
    lines.push(`layer ${l + 1}: ` + used.map(([k, j]) =>
      `${state.tasks[j]}'s node${k > 1 ? ` shared by ${k} tasks` : ""}`).join(", "));
  }
  svg.append(s("title", { id: titleId },
    `Tree ${arch.id}: ${lines.join("; ")}. Heads: ${heads.map((j) => state.tasks[j]).join(", ")}.`));

  const edges = s("g", { fill: "none", "stroke-width": 2.2 });
  const curve = (x1, y1, x2, y2) => {
    const my = (y1 + y2) / 2;
    return `M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2}`;
  };
  // image -> used nodes of layer 0
  for (let j = 0; j < n; j++) {
    if (count[0][j] > 0) {
      edges.append(s("path", {
        d: curve(W / 2, y(-1) - 10, x(j), y(0) + 12), stroke: "#9aa6bd", "data-from": "image",
        "data-to": `0,${j}`,
      }));
    }
  }
  for (let l = 1; l < L; l++) {
    for (let j = 0; j < n; j++) {
      if (count[l][j] === 0) continue;
      const p = arch.parents[l - 1][j];
      edges.append(s("path", {
        d: curve(x(p), y(l - 1) - 12, x(j), y(l) + 12), stroke: count[l][j] > 1 ? "#1b2130" : "#6b7588",
        "data-from": `${l - 1},${p}`, "data-to": `${l},${j}`, class: "edge",
      }));
    }
  }
  for (const j of heads) {
    edges.append(s("path", { d: curve(x(j), y(L - 1) - 12, x(j), y(L) + 11), stroke: "#6b7588" }));
  }
  svg.append(edges);

  const nodes = s("g", {});
  for (let l = 0; l < L; l++) {
    for (let j = 0; j < n; j++) {
      const k = count[l][j];
      const g = s("g", {
        class: "node", "data-layer": l, "data-stream": j, "data-used": k > 0,
        "data-shared": k > 1, "data-count": k,
      });
      g.append(s("rect", {
        x: x(j) - 20, y: y(l) - 12, width: 40, height: 24, rx: 6,
        fill: k > 0 ? taskColor(j) : "#fff", "fill-opacity": k > 0 ? 0.9 : 1,
        stroke: k > 1 ? "#1b2130" : k > 0 ? taskColor(j) : "#c3c9d4",
        "stroke-width": k > 1 ? 3 : 1.2, "stroke-dasharray": k > 0 ? null : "3 3",
      }));
      if (k > 1) {
        g.append(s("text", {
          x: x(j), y: y(l) + 4.5, "text-anchor": "middle", "font-size": 12, fill: "#fff",
          "font-weight": 700,
        }, `×${k}`));
      }
      nodes.append(g);
    }
    svg.append(s("text", {
      x: 2, y: y(l) + 4, "font-size": 10, fill: "#8a93a3",
    }, `${l + 1}`));
  }
  for (let j = 0; j < n; j++) {
    const on = heads.includes(j);
    const name = state.tasks[j].length > 12 ? `${state.tasks[j].slice(0, 11)}…` : state.tasks[j];
    nodes.append(s("text", {
      x: x(j), y: y(L) + 4, "text-anchor": "middle", "font-size": 11,
      "font-weight": on ? 700 : 400, fill: on ? taskColor(j) : "#b0b6c2", "data-head": j,
    }, name));
  }
  nodes.append(s("text", {
    x: W / 2, y: y(-1) + 4, "text-anchor": "middle", "font-size": 12, fill: "#5a6373",
  }, "image"));
  svg.append(nodes);
  container.replaceChildren(svg);

  if (legend) {
    const shared = count.flat().filter((k) => k > 1).length;
    const used = count.flat().filter((k) => k > 0).length;
    legend.replaceChildren(
      h("span", { text: "a node's colour: the stream whose weights it runs" }),
      h("span", { text: `×k: shared by k tasks (${shared} shared node${shared === 1 ? "" : "s"})` }),
      h("span", { text: `dashed: not run (${used} of ${n * L} run)` }));
  }
}

// ---------------------------------------------------------------------------- the cost map
const scheduleCostMap = debounce(() => loadCostMap(), 200);

function costMapResolution() {
  if (N() === 2) return 50;
  if (N() === 3) return 30;
  let res = 1; // the finest grid with at most 2,000 points
  while (res < 100 && binom(res + 1 + N() - 1, N() - 1) <= 2000) res += 1;
  return res;
}

async function loadCostMap() {
  if (!state.model) return;
  const seq = ++state.costSeq;
  const res = costMapResolution();
  let url = `/v1/cost-map?c=${state.c}&resolution=${res}`;
  if (!allSelected()) url += `&tasks=${encodeURIComponent(subsetIdx().map((j) => state.tasks[j]).join(","))}`;
  try {
    let map = state.costMaps.get(url);
    if (!map) {
      map = (await api(url)).body;
      state.costMaps.set(url, map);
    }
    if (seq !== state.costSeq) return;
    map.index = new Map(map.points.map((p, i) => [gridKey(p.r, map.resolution), i]));
    state.costMap = map;
    state.costImage = null;
    renderCostMapFrame(map);
    drawCostMap();
  } catch (err) {
    if (seq === state.costSeq) showError(err);
  }
}

function renderCostMapFrame(map) {
  const box = $("costmap");
  box.dataset.c = map.c;
  box.dataset.min = map.min_gflops;
  box.dataset.max = map.max_gflops;
  box.dataset.points = map.n_points;
  box.dataset.trees = map.n_architectures;
  let canvas = box.querySelector("canvas");
  if (!canvas) {
    canvas = h("canvas", { role: "img", "data-testid": "costmap-canvas" });
    canvas.addEventListener("click", (e) => pickFromCostMap(canvas, e));
    canvas.addEventListener("pointermove", (e) => hoverCostMap(canvas, e));
    box.append(canvas);
  }
  $("costmap-min").textContent = `${fmtG(map.min_gflops)} GFLOPs`;
  $("costmap-max").textContent = `${fmtG(map.max_gflops)} GFLOPs`;
  const what = allSelected() ? "all tasks" : map.subset.join(", ");
  const summary = `c = ${map.c.toFixed(2)}, ${what}: ${fmtG(map.min_gflops)} to ` +
    `${fmtG(map.max_gflops)} GFLOPs over ${map.n_points} preferences, ` +
    `${map.n_architectures} distinct trees`;
  canvas.setAttribute("aria-label", `Cost map: ${summary}`);
  $("costmap-caption").textContent = `${summary}` +
    (N() === 3 ? "; lines separate trees; click to pick." : ".");
}

function canvasSize(canvas, w, hgt) {
  const dpr = Math.min(2, window.devicePixelRatio || 1);
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(hgt * dpr);
  return dpr;
}

/** The cost map's pixels (cached until the map changes); then the current point on top. */
function drawCostMap() {
  const map = state.costMap;
  const canvas = $("costmap").querySelector("canvas");
  if (!map || !canvas) return;
  const n = N();
  const span = map.max_gflops - map.min_gflops;
  const tone = (g) => viridis(span > 0 ? (g - map.min_gflops) / span : 0.5);
  if (!state.costImage) {
    if (n === 3) state.costImage = simplexImage(canvas, map, tone);
    else if (n === 2) state.costImage = stripImage(canvas, map, tone);
    else state.costImage = histogramImage(canvas, map);
  }
  const ctx = canvas.getContext("2d");
  ctx.putImageData(state.costImage.data, 0, 0);
  const dpr = state.costImage.dpr;
  ctx.save();
  ctx.scale(dpr, dpr);
  ctx.lineWidth = 2.5;
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#1b2130";
  if (n === 3) {
    const [px, py] = TRI.point(state.r);
    ctx.beginPath();
    ctx.arc(px, py, 7, 0, 2 * Math.PI);
    ctx.fill();
    ctx.stroke();
  } else if (n === 2) {
    const px = 10 + state.r[1] * 280;
    ctx.fillRect(px - 2, 4, 4, 40);
  } else if (state.record) {
    const g = state.record.cost.gflops;
    const px = 10 + (span > 0 ? (g - map.min_gflops) / span : 0.5) * 280;
    ctx.fillStyle = "#d9480f";
    ctx.fillRect(px - 1.5, 0, 3, 110);
  }
  ctx.restore();
}

function simplexImage(canvas, map, tone) {
  const dpr = canvasSize(canvas, TRI.w, TRI.h);
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(canvas.width, canvas.height);
  const owner = new Int32Array(canvas.width * canvas.height).fill(-1);
  const trees = map.points.map((p) => p.architecture_id);
  for (let py = 0; py < canvas.height; py++) {
    for (let px = 0; px < canvas.width; px++) {
      const b = TRI.barycentric((px + 0.5) / dpr, (py + 0.5) / dpr);
      if (Math.min(...b) < 0) continue;
      const i = map.index.get(gridKey(b, map.resolution));
      if (i === undefined) continue;
      owner[py * canvas.width + px] = i;
    }
  }
  for (let py = 0; py < canvas.height; py++) {
    for (let px = 0; px < canvas.width; px++) {
      const at = py * canvas.width + px;
      const i = owner[at];
      if (i < 0) continue;
      let [r, g, b] = tone(map.points[i].gflops);
      const left = px > 0 ? owner[at - 1] : -1;
      const up = py > 0 ? owner[at - canvas.width] : -1;
      if ((left >= 0 && trees[left] !== trees[i]) || (up >= 0 && trees[up] !== trees[i])) {
        [r, g, b] = [r * 0.35, g * 0.35, b * 0.35]; // a tree boundary
      }
      img.data.set([r, g, b, 255], at * 4);
    }
  }
  ctx.putImageData(img, 0, 0);
  ctx.save();
  ctx.scale(dpr, dpr);
  ctx.font = "600 13px system-ui, sans-serif";
  const anchors = [["center", 0, -10], ["left", -18, 18], ["right", 18, 18]];
  TRI.v.forEach(([x, y], j) => {
    ctx.textAlign = anchors[j][0];
    ctx.fillStyle = taskColor(j);
    ctx.fillText(state.tasks[j], x + anchors[j][1], y + anchors[j][2]);
  });
  ctx.restore();
  return { data: ctx.getImageData(0, 0, canvas.width, canvas.height), dpr };
}

function stripImage(canvas, map, tone) {
  const dpr = canvasSize(canvas, 300, 70);
  const ctx = canvas.getContext("2d");
  ctx.save();
  ctx.scale(dpr, dpr);
  for (let x = 0; x < 280; x++) {
    const r1 = x / 279;
    const i = map.index.get(gridKey([1 - r1, r1], map.resolution));
    ctx.fillStyle = `rgb(${tone(map.points[i].gflops).join(" ")})`;
    ctx.fillRect(10 + x, 8, 1, 32);
  }
  ctx.font = "600 13px system-ui, sans-serif";
  ctx.fillStyle = taskColor(0);
  ctx.fillText(`← ${state.tasks[0]}`, 10, 62);
  ctx.textAlign = "right";
  ctx.fillStyle = taskColor(1);
  ctx.fillText(`${state.tasks[1]} →`, 290, 62);
  ctx.restore();
  return { data: ctx.getImageData(0, 0, canvas.width, canvas.height), dpr };
}

/** More than 3 tasks: the distribution of GFLOPs over the grid (the simplex has no 2-D map). */
function histogramImage(canvas, map) {
  const dpr = canvasSize(canvas, 300, 130);
  const ctx = canvas.getContext("2d");
  const bins = new Array(28).fill(0);
  const span = map.max_gflops - map.min_gflops;
  for (const p of map.points) {
    const t = span > 0 ? (p.gflops - map.min_gflops) / span : 0.5;
    bins[Math.min(bins.length - 1, Math.floor(t * bins.length))] += 1;
  }
  const top = Math.max(...bins);
  ctx.save();
  ctx.scale(dpr, dpr);
  bins.forEach((k, i) => {
    const hgt = (k / top) * 100;
    ctx.fillStyle = `rgb(${viridis((i + 0.5) / bins.length).join(" ")})`;
    ctx.fillRect(10 + i * 10, 110 - hgt, 9, hgt);
  });
  ctx.fillStyle = "#5a6373";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText("preferences per GFLOPs bin; orange: the current one", 10, 126);
  ctx.restore();
  return { data: ctx.getImageData(0, 0, canvas.width, canvas.height), dpr };
}

function costMapPoint(canvas, e) {
  const rect = canvas.getBoundingClientRect();
  const x = ((e.clientX - rect.left) / rect.width) * TRI.w;
  const y = ((e.clientY - rect.top) / rect.height) * TRI.h;
  return [x, y];
}

function pickFromCostMap(canvas, e) {
  if (N() === 3) setR(TRI.rAt(...costMapPoint(canvas, e)));
  else if (N() === 2) {
    const rect = canvas.getBoundingClientRect();
    const r1 = clamp((((e.clientX - rect.left) / rect.width) * 300 - 10) / 280, 0, 1);
    setR([1 - r1, r1]);
  }
}

function hoverCostMap(canvas, e) {
  const map = state.costMap;
  if (!map || N() !== 3) return;
  const [x, y] = costMapPoint(canvas, e);
  const b = TRI.barycentric(x, y);
  if (Math.min(...b) < 0) return;
  const p = map.points[map.index.get(gridKey(b, map.resolution))];
  if (p) canvas.title = `r ${fmtR(p.r)}: ${fmtG(p.gflops)} GFLOPs, tree ${p.architecture_id}`;
}

// ------------------------------------------------------------------------------ predictions
function setImage(blob, name) {
  state.image = blob;
  state.imageName = name;
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(blob);
  $("predict-btn").disabled = false;
  updateCompareButton();
}

async function loadSample(predict) {
  const res = await fetch("/explorer/example.png");
  setImage(await res.blob(), "example.png");
  if (predict) predictCurrent();
}

async function predictWith(rec) {
  const form = new FormData();
  form.append("image", state.image, state.imageName || "image.png");
  form.append("preference_id", rec.preference_id);
  form.append("tasks", subsetIdx().map((j) => state.tasks[j]).join(","));
  form.append("format", "json");
  return api("/predict", { method: "POST", body: form });
}

async function predictCurrent() {
  if (!state.image) return;
  const seq = ++state.predictSeq;
  const box = $("prediction");
  box.dataset.pending = "true";
  try {
    const { body: rec } = await postPreference(state.r, state.c);
    const { body, ms } = await predictWith(rec);
    if (seq !== state.predictSeq) return;
    clearError();
    state.predicted = true;
    await renderPrediction(box, body, ms, rec, {});
  } catch (err) {
    if (seq === state.predictSeq) showError(err);
  } finally {
    if (seq === state.predictSeq) box.dataset.pending = "false";
  }
}

async function decodePng(b64) {
  const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
  const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }), {
    colorSpaceConversion: "none", premultiplyAlpha: "none",
  });
  const canvas = h("canvas", { width: bitmap.width, height: bitmap.height });
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  return ctx.getImageData(0, 0, bitmap.width, bitmap.height);
}

function mapCanvas(img, testid, label) {
  const canvas = h("canvas", {
    width: img.width, height: img.height, "data-testid": testid, role: "img", "aria-label": label,
  });
  canvas.getContext("2d").putImageData(img, 0, 0);
  return canvas;
}

async function segmentationFigure(task, out) {
  const img = await decodePng(out.png);
  const counts = new Map();
  for (let i = 0; i < img.data.length; i += 4) {
    const k = img.data[i]; // the class index (8-bit grey PNG: R = G = B)
    counts.set(k, (counts.get(k) || 0) + 1);
    img.data.set(segColor(k), i);
    img.data[i + 3] = 255;
  }
  const total = img.width * img.height;
  const present = [...counts.keys()].sort((a, b) => a - b);
  const canvas = mapCanvas(img, `map-${task}`, `${task}: classes ${present.join(", ")}`);
  canvas.dataset.classes = present.join(",");
  const legend = h("div", { class: "legend", "data-testid": `legend-${task}` },
    [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 12).map(([k, c]) => {
      const sw = h("span", { class: "swatch" });
      sw.style.background = `rgb(${segColor(k).join(" ")})`;
      return h("span", { "data-class": k }, sw, `class ${k} · ${pct(c / total)}`);
    }));
  return [canvas, legend, `${out.classes} classes; ${present.length} present`];
}

async function depthFigure(task, out) {
  const img = await decodePng(out.png);
  for (let i = 0; i < img.data.length; i += 4) {
    img.data.set(viridis(img.data[i] / 255), i); // the browser gives the 16-bit PNG's top byte
    img.data[i + 3] = 255;
  }
  const lo = out.offset;
  const hi = out.offset + 65535 * out.scale;
  const canvas = mapCanvas(img, `map-${task}`, `${task}: from ${lo.toFixed(3)} to ${hi.toFixed(3)}`);
  canvas.dataset.min = lo;
  canvas.dataset.max = hi;
  const bar = h("canvas", { class: "colorbar", width: 128, height: 10, "aria-hidden": "true" });
  drawColorbar(bar);
  const legend = h("div", { class: "colorbar-row", "data-testid": `legend-${task}` }, bar,
    h("div", { class: "colorbar-labels" },
      h("span", { text: lo.toFixed(3) }), h("span", { text: hi.toFixed(3) })));
  return [canvas, legend, "depth, the model's units"];
}

async function normalsFigure(task, out) {
  const img = await decodePng(out.png);
  const canvas = mapCanvas(img, `map-${task}`, `${task}: unit normals as RGB`);
  const legend = h("div", { class: "legend", "data-testid": `legend-${task}` },
    h("span", { text: "RGB = (n + 1) / 2: x → red, y → green, z → blue" }));
  return [canvas, legend, "surface normals"];
}

function classificationFigure(task, out) {
  const top = out.probabilities.map((p, k) => [p, k]).sort((a, b) => b[0] - a[0]).slice(0, 5);
  const list = h("ul", { class: "probs", "data-testid": `map-${task}`, "data-label": out.label },
    top.map(([p, k]) => {
      const bar = h("span", { class: "bar" });
      bar.style.width = `${(100 * p).toFixed(1)}%`;
      return h("li", {}, h("span", { text: `class ${k}` }), h("span", {}, bar),
        h("span", { text: pct(p) }));
    }));
  return [list, null, `label ${out.label} of ${out.classes}`];
}

const FIGURES = {
  segmentation: segmentationFigure,
  depth: depthFigure,
  normals: normalsFigure,
  classification: classificationFigure,
};

async function renderPrediction(box, result, ms, rec, { compact = false }) {
  const m = result.metrics;
  const figures = [h("figure", { class: "map", "data-task": "input" },
    h("figcaption", { text: `input ${m.input_size.join("×")}` }),
    h("img", { src: state.imageUrl, alt: `the input image, ${state.imageName}` }))];
  for (const task of m.tasks) {
    const out = result.outputs[task];
    const [visual, legend, note] = await FIGURES[out.kind](task, out);
    figures.push(h("figure", { class: "map", "data-task": task },
      h("figcaption", {}, task, h("span", { class: "muted", text: ` · ${note}` })),
      visual, legend));
  }
  const metrics = h("ul", { class: "metrics", "data-testid": "predict-metrics" },
    h("li", {}, h("b", { "data-testid": "pred-gflops", text: fmtG(m.gflops) }), " GFLOPs ",
      h("span", { class: "muted", "data-testid": "pred-flops", "data-value": m.flops,
        text: `(${fmtInt(m.flops)} FLOPs)` })),
    h("li", {}, "params ", h("b", { text: fmtInt(m.params) })),
    h("li", {}, "model ", h("b", { "data-testid": "pred-model-ms", text: fmtMs(m.model_ms) })),
    compact ? null : h("li", {}, "queue ", h("b", { text: fmtMs(m.queue_ms) })),
    h("li", {}, "server ", h("b", { "data-testid": "pred-total-ms", text: fmtMs(m.total_ms) })),
    compact ? null : h("li", {}, "round trip ", h("b", { text: fmtMs(ms) })),
    h("li", {}, "backend ", h("b", { text: m.backend })),
    compact ? null : h("li", {}, "tasks ", h("b", { "data-testid": "pred-tasks", text: m.tasks.join(", ") })),
    compact ? null : h("li", {}, "tree ", h("code", { text: m.architecture_id })));
  box.dataset.preferenceId = m.preference_id;
  box.dataset.tasks = m.tasks.join(",");
  box.replaceChildren(h("div", { class: "maps" }, figures), metrics);
}

// --------------------------------------------------------------------------------- compare
function keepForCompare(slot) {
  state.compare[slot] = { r: state.r.slice(), c: state.c };
  const col = $(`compare-${slot.toLowerCase()}`);
  col.replaceChildren(h("h3", { text: `${slot}: r ${fmtR(state.r)}, c ${state.c.toFixed(2)}` }),
    h("p", { class: "muted", text: "kept; run the comparison to see its maps" }));
  updateCompareButton();
}

function updateCompareButton() {
  $("compare-btn").disabled = !(state.compare.A && state.compare.B && state.image);
}

async function runCompare() {
  const results = {};
  try {
    for (const slot of ["A", "B"]) {
      const { r, c } = state.compare[slot];
      const { body: rec } = await postPreference(r, c);
      const { body, ms } = await predictWith(rec);
      results[slot] = { rec, body, ms };
    }
    clearError();
  } catch (err) {
    showError(err);
    return;
  }
  for (const slot of ["A", "B"]) {
    const { rec, body, ms } = results[slot];
    const col = $(`compare-${slot.toLowerCase()}`);
    const tree = h("div", { class: "tree", id: `compare-tree-${slot}` });
    const maps = h("div", { class: "compare-maps" });
    col.dataset.preferenceId = rec.preference_id;
    col.dataset.flops = body.metrics.flops;
    col.replaceChildren(
      h("h3", { text: `${slot}: r ${fmtR(rec.r)}, c ${rec.c.toFixed(2)}` }),
      h("p", { class: "muted" }, `${fmtG(body.metrics.gflops)} GFLOPs · tree `,
        h("code", { text: rec.architecture.id }),
        ` · ${rec.architecture.n_used_nodes} of ${rec.architecture.n_nodes} nodes`),
      tree, maps);
    renderTree(tree, rec.architecture, { compact: true });
    await renderPrediction(maps, body, ms, rec, { compact: true });
  }
  const [a, b] = [results.A.body.metrics.flops, results.B.body.metrics.flops];
  const note = a === b ? "A and B run the same FLOPs"
    : `B runs ${pct(Math.abs(b - a) / a)} ${b < a ? "fewer" : "more"} FLOPs than A`;
  $("compare-b").append(h("p", { class: "hint", "data-testid": "compare-note", text: note }));
}

init().catch((err) => {
  showError(err);
  setStatus("the explorer could not start");
});
