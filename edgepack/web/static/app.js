// edgepack's page: picks model / engine / variant from /api/models, talks to the inference worker, shows the
// answer as it streams and the live figures. window.edgepack mirrors the state for tests and for curious users.
const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const state = window.edgepack = { status: "starting", caps: null, models: [], loaded: null, done: null, error: null,
                                  tokens: [], firstTokenAt: null };
const worker = new Worker("/static/worker.js", { type: "module" });
let messages = [];
let answer = null;   // the assistant message being streamed
let pending = null;  // resolves when the worker answers a request
let loadedKey = null;

const setStatus = (text) => { state.status = text; $("status").textContent = text; };
const fmt = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const mb = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;

function ask(message) {
  return new Promise((resolve, reject) => { pending = { resolve, reject }; worker.postMessage(message); });
}

worker.onmessage = ({ data }) => {
  switch (data.type) {
    case "progress": {
      const bar = $("progress");
      bar.hidden = false;
      bar.max = data.total || 1;
      bar.value = data.total ? data.loaded : 0;
      setStatus(`downloading ${data.label}: ${mb(data.loaded)}${data.total ? ` of ${mb(data.total)}` : ""}`);
      break;
    }
    case "token":
      if (data.id !== null) state.tokens.push(data.id);
      if (state.firstTokenAt === null) state.firstTokenAt = performance.now() / 1000;  // s since navigation
      answer.textContent += data.delta;
      $("f-tokens").textContent = data.count;
      if (data.tps) $("f-tps").textContent = fmt(data.tps, 1);
      break;
    case "error":
      state.error = data.message;
      pending?.reject(new Error(data.message));
      break;
    default:
      pending?.resolve(data);
  }
};
worker.onerror = (e) => { state.error = e.message || "the worker failed to start"; setStatus(state.error); };

// ---- choices ----------------------------------------------------------------------------------------------
function variantsFor(slug, engine) {
  const model = state.models.find((m) => m.slug === slug);
  const want = engine === "wllama" ? ["cpu", "gguf"] : ["web", "onnx"];
  const target = model?.targets.find((t) => t.target === want[0]);
  return (target?.variants || []).filter((v) => v.format === want[1]);
}

function needsF16(variant) { return /f16|fp16/.test(variant.variant); }

function webgpuBlocker(variant) {
  // measured: onnxruntime-web's WebGPU returns garbage logits for blockwise 4-bit DequantizeLinear (WASM folds it
  // right), and q4dq's fp16 embedding table needs shader-f16 besides: q4dq is the WASM variant
  if (variant.variant === "q4dq") return "4-bit DequantizeLinear: wrong results on onnxruntime-web's WebGPU";
  if (needsF16(variant) && !state.caps?.shaderF16) return "this GPU adapter has no shader-f16";
  return null;
}

function fillVariants(preferred) {
  const engine = $("engine").value;
  const select = $("variant");
  select.replaceChildren();
  // Defaults: on WASM q4dq (a 4-bit download expanded to fp32 at load: onnxruntime-web's WASM MatMulNBits is slow);
  // on WebGPU q4f16 where the adapter has shader-f16, else q4 (its 8-bit embedding needs no f16), as transformers.js
  // users pick; on wllama the smallest good GGUF.
  const order = engine === "wllama" ? ["Q4_K_M", "Q4_0", "Q8_0"]
    : engine === "webgpu" ? ["q4f16", "q4", "fp16", "fp32"] : ["q4dq", "q4", "fp32"];
  const variants = variantsFor($("model").value, engine);
  const blocked = (v) => (engine === "webgpu" ? webgpuBlocker(v) : null);
  for (const v of variants) {
    const option = new Option(`${v.variant} · ${mb(v.files.reduce((s, f) => s + f.bytes, 0))}`, v.variant);
    if (blocked(v)) {
      option.disabled = true;
      option.textContent += ` (${blocked(v)})`;
    }
    select.add(option);
  }
  const names = variants.filter((v) => !blocked(v)).map((v) => v.variant);
  select.value = [preferred, ...order].find((n) => names.includes(n)) || names[0] || "";
  $("load").disabled = !select.value;
}

function defaultEngine() {
  const slug = $("model").value;
  const onnx = variantsFor(slug, "wasm").length > 0;
  // WebGPU when a hardware adapter exists; a software adapter (SwiftShader) is slower than WASM, so not by default.
  if (onnx && state.caps?.webgpu && !state.caps.software) return "webgpu";
  if (onnx) return "wasm";
  return variantsFor(slug, "wllama").length ? "wllama" : "wasm";
}

// ---- actions ----------------------------------------------------------------------------------------------
async function load() {
  const slug = $("model").value;
  const engine = $("engine").value;
  const variant = variantsFor(slug, engine).find((v) => v.variant === $("variant").value);
  if (!variant) return;
  const key = `${slug}/${engine}/${variant.variant}`;
  if (key === loadedKey) return;
  $("send").disabled = $("load").disabled = true;
  state.loaded = null;
  setStatus(`loading ${key}…`);
  const file = variant.files.find((f) => /\.(onnx|gguf)$/.test(f.path)).path;
  const request = { type: "load", engine };
  if (engine === "wllama") {
    request.url = `/models/${slug}/${file}`;
    const model = state.models.find((m) => m.slug === slug);
    if (model.targets.some((t) => t.target === "web")) {  // bos/eos text for templates that use them
      const config = await fetch(`/models/${slug}/web/tokenizer_config.json`).then((r) => (r.ok ? r.json() : {}));
      request.special = { bos_token: config.bos_token, eos_token: config.eos_token };
    }
  } else {
    const [dir, ...rest] = file.split("/");
    request.base = `/models/${slug}/${dir}`;
    request.file = rest.join("/");
  }
  try {
    const loaded = await ask(request);
    loadedKey = key;
    state.loaded = { ...loaded, slug, variant: variant.variant };
    $("f-load").textContent = fmt(loaded.seconds);
    $("f-engine").textContent = loaded.device === engine ? engine : `${engine} (${loaded.device})`;
    $("f-variant").textContent = variant.variant;
    setStatus(`ready: ${slug} · ${variant.variant} on ${engine}`);
  } catch (e) {
    loadedKey = null;
    setStatus(`could not load ${key}: ${e.message}`);
  } finally {
    $("progress").hidden = true;
    $("send").disabled = loadedKey === null;
    $("load").disabled = false;
  }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("chat").append(div);
  return div;
}

async function send(event) {
  event?.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || loadedKey === null) return;
  messages.push({ role: "user", content: text });
  bubble("user", text);
  answer = bubble("assistant", "");
  $("prompt").value = "";
  $("send").disabled = true;
  $("stop").disabled = false;
  state.done = null;
  state.tokens = [];
  $("f-ttft").textContent = $("f-tps").textContent = "–";
  setStatus("generating…");
  const greedy = $("greedy").checked;
  try {
    const done = await ask({
      type: "generate", messages, maxTokens: Number($("max_tokens").value),
      temperature: greedy ? 0 : Number($("temperature").value), topP: greedy ? 1 : Number($("top_p").value),
      seed: Number(query.get("seed") || Math.floor(Math.random() * 2 ** 31)), wantIds: query.get("ids") === "1",
    });
    messages.push({ role: "assistant", content: done.text });
    state.done = done;
    $("f-ttft").textContent = fmt(done.ttft);
    $("f-tps").textContent = fmt(done.decodeTps, 1);
    setStatus(done.stopped ? "stopped" : "done");
  } catch (e) {
    messages.pop();
    answer.classList.add("error");
    answer.textContent = e.message;
    setStatus("error");
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

// ---- start ------------------------------------------------------------------------------------------------
async function start() {
  const [caps, models] = await Promise.all([ask({ type: "caps" }), fetch("/api/models").then((r) => r.json())]);
  state.caps = caps;
  state.models = models;
  $("caps").textContent = [
    caps.webgpu ? `WebGPU adapter: ${caps.adapter}${caps.software ? " (software)" : ""}${caps.shaderF16 ? ", shader-f16" : ", no shader-f16"}`
                : "no WebGPU adapter: WASM only",
    `WASM threads: ${caps.threads}${caps.crossOriginIsolated ? "" : " (page not cross-origin isolated)"}`,
  ].join(" · ");
  const select = $("model");
  for (const m of models) select.add(new Option(m.slug, m.slug));
  if (!models.length) { setStatus("nothing exported yet: run edgepack export --target web cpu"); return; }
  if (query.get("model")) select.value = query.get("model");
  const gpuOption = $("engine").querySelector("option[value=webgpu]");
  gpuOption.disabled = !caps.webgpu;
  $("engine").value = query.get("engine") || defaultEngine();
  fillVariants(query.get("variant"));
  for (const key of ["prompt", "temperature", "top_p"]) if (query.has(key)) $(key).value = query.get(key);
  if (query.has("n")) $("max_tokens").value = query.get("n");
  if (query.has("temperature")) $("greedy").checked = Number(query.get("temperature")) === 0;
  setStatus("pick a variant and load it");
  if (query.get("auto") === "1") { await load(); if (loadedKey) await send(); }
}

$("model").onchange = () => { $("engine").value = defaultEngine(); fillVariants(); };
$("engine").onchange = () => fillVariants();
$("load").onclick = load;
$("ask").onsubmit = send;
$("stop").onclick = () => worker.postMessage({ type: "stop" });
$("clear").onclick = () => { messages = []; $("chat").replaceChildren(); };
$("prompt").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); };
start().catch((e) => { state.error = e.message; setStatus(`error: ${e.message}`); });
