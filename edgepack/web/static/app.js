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

// ---- WASM memory ----------------------------------------------------------------------------------------------
// wasm32 gives a page at most 4 GiB of heap. ?wasmBudget=MB sets a lower one (the tests use it to stand in for a
// model too large to build here).
const WASM_BUDGET = Number(query.get("wasmBudget") || 4096) * 2 ** 20;
const configs = {};  // slug -> the web target's config.json
const fileBytes = (variant) => variant.files.reduce((s, f) => s + f.bytes, 0);

// The WASM heap a variant leaves behind once onnxruntime-web 1.30 has loaded it (the heap only grows, so this is the
// load's high-water mark). Measured on the default model (135M parameters) in Chromium, the page's heap after load:
// fp32 3.1x its file, q4 2.7x, int8 2.7x as one file (the file, its parsed copy and the initializers made from it); q4dq 2365 MB
// for a 165 MB file, 17.6 bytes a parameter: its 4-bit weights are expanded to float32 at load by constant folding,
// whose intermediate tensors (dequantized weights, the zero-point residual expanded and added) all stand at once. So
// q4dq, the fastest WASM variant, stops fitting wasm32's 4 GiB above ~220M parameters, and int8 (1 byte a parameter
// in the file) takes over.
const HEAP_PER_FILE_BYTE = 3.2;
// With its weights in model*.onnx_data (int8; any graph over 2 GB) onnxruntime-web copies each tensor in once:
// measured 1.23-1.32x for the default model's int8 (168-181 MB heap for 137 MB of files; 366 MB as one file).
const HEAP_PER_EXTERNAL_BYTE = 1.4;
const external = (variant) => variant.files.some((f) => f.path.endsWith(".onnx_data"));
const Q4DQ_HEAP_PER_PARAMETER = 17.6;

function parameters(c) {
  const hidden = c.hidden_size, heads = c.num_attention_heads, kv = c.num_key_value_heads || heads;
  const dim = c.head_dim || hidden / heads, table = c.vocab_size * hidden;
  return c.num_hidden_layers * (hidden * (heads + 2 * kv) * dim + heads * dim * hidden + 3 * hidden * c.intermediate_size)
    + table * (c.tie_word_embeddings === false ? 2 : 1);
}

function wasmNeed(slug, variant) {
  const c = configs[slug];
  if (variant.variant === "q4dq" && c) return Q4DQ_HEAP_PER_PARAMETER * parameters(c);
  return (external(variant) ? HEAP_PER_EXTERNAL_BYTE : HEAP_PER_FILE_BYTE) * fileBytes(variant);
}

function wasmBlocker(slug, variant) {
  const need = wasmNeed(slug, variant);
  if (need <= WASM_BUDGET) return null;
  return `needs ~${(need / 2 ** 30).toFixed(2)} GiB of WASM heap, over the ${(WASM_BUDGET / 2 ** 30).toFixed(2)} GiB limit`;
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
  // Defaults, fastest first among what fits: on WASM int8 (MatMulInteger's int8 SIMD kernels; one byte a weight in
  // the heap), then q4dq (a 4-bit download expanded to fp32 at load: 17.6 bytes a parameter, so it fits wasm32 only
  // to ~220M parameters), then fp32 and the slow MatMulNBits. Measured by bench --browser on the default model, same
  // run: int8 37.5-39.0 tok/s, q4dq 27.0-27.3, from the first load on; q4dq's parity is closer (KL 0.00017 / top-1
  // 0.990 against int8's 0.0043 / 0.960, both within the web bars), so it stays one click away. On WebGPU q4f16
  // where the adapter has shader-f16, else q4 (its 8-bit embedding needs no f16), as transformers.js users pick; on
  // wllama the smallest good GGUF.
  const order = engine === "wllama" ? ["Q4_K_M", "Q4_0", "Q8_0"]
    : engine === "webgpu" ? ["q4f16", "q4", "fp16", "fp32"] : ["int8", "q4dq", "fp32", "q4", "q8"];
  const rule = engine === "wllama" ? "the smallest good GGUF"
    : engine === "webgpu" ? "4-bit weights, fp16 where the adapter has shader-f16"
    : "the fastest on WASM (bench --browser) whose heap fits";
  const slug = $("model").value;
  const variants = variantsFor(slug, engine);
  const blocked = (v) => (engine === "webgpu" ? webgpuBlocker(v) : engine === "wasm" ? wasmBlocker(slug, v) : null);
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
  // say which was chosen and why: the rule, and what was passed over on the way
  const passed = order.slice(0, Math.max(0, order.indexOf(select.value))).map((n) => variants.find((v) => v.variant === n))
    .filter((v) => v && blocked(v));
  const why = select.value === preferred ? "asked for"
    : [rule, ...passed.map((v) => `${v.variant} ${blocked(v)}`)].join("; ");
  state.choice = {
    variant: select.value, why, passedOver: passed.map((v) => ({ variant: v.variant, why: blocked(v) })),
    blocked: variants.filter(blocked).map((v) => ({ variant: v.variant, why: blocked(v) })),
  };
  $("why").textContent = select.value ? `${select.value} chosen: ${why}` : "";
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
    const data = variant.files.find((f) => f.path === `${file}_data`);  // external data beside the graph, if any
    if (data) request.data = data.path.split("/").slice(1).join("/");
  }
  try {
    const loaded = await ask(request);
    loadedKey = key;
    state.loaded = { ...loaded, slug, variant: variant.variant };
    $("f-load").textContent = fmt(loaded.seconds);
    $("f-engine").textContent = loaded.device === engine ? engine : `${engine} (${loaded.device})`;
    $("f-variant").textContent = variant.variant;
    // wllama runs its WASM in a worker of its own, whose heap this worker does not see
    $("f-heap").textContent = loaded.heapBytes && engine !== "wllama" ? fmt(loaded.heapBytes / 1e6, 0) : "–";
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
  await Promise.all(models.filter((m) => m.targets.some((t) => t.target === "web")).map(async (m) => {
    const r = await fetch(`/models/${m.slug}/web/config.json`);
    if (r.ok) configs[m.slug] = await r.json();
  }));
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
