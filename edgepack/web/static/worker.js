// edgepack's inference worker: runs the model off the main thread so the page stays responsive.
// Engines: onnxruntime-web (WebGPU or WASM) for the ONNX variants, wllama (llama.cpp in WASM) for the GGUF ones.
// Every script comes from npm through the server's /vendor/ route: nothing is fetched from a CDN.
//
// Written by hand (no library does it for a raw ONNX decoder): the greedy / top-p decode loop over
// onnxruntime-web with the KV cache fed back step to step. transformers.js' generate() runs the same graph but
// re-wraps every tensor per step; this loop keeps the cache where the runtime left it (on the GPU for WebGPU).
// Two builds of the same onnxruntime-web release: for WASM the plain one (ort.wasm: ort-wasm-simd-threaded.wasm,
// 14 MB), and for WebGPU ort.webgpu's native WebGPU execution provider (the C++ one transformers.js uses). Not
// ort.all: its WebGPU is the older JSEP provider, whose MatMulNBits rejects 8-bit weights (q4's lm_head and
// embedding, q8), and its WASM engine is the JSEP .wasm (28 MB, WebGPU's glue besides), under which a page's int8
// decoded at 19-26 tok/s, rising only over a long answer (256 tokens: 29, then 40) as if V8 were still optimizing
// it; under the plain build int8 runs at 36-49 from the first load (bench --browser, default model, same run:
// int8 37.5 against q4dq's 27.3; README). Each build loads its .wasm only when a session is first made on it.
import * as ort from "/vendor/onnxruntime-web/dist/ort.wasm.min.mjs";
import * as ortWebgpu from "/vendor/onnxruntime-web/dist/ort.webgpu.min.mjs";
import { Tokenizer } from "/vendor/@huggingface/tokenizers/dist/tokenizers.min.mjs";
import { Template } from "/vendor/@huggingface/jinja/dist/index.js";
import { Wllama } from "/vendor/@wllama/wllama/esm/index.js";

// The WASM heaps the engines make, recorded as they are made, so the page can report the heap after a load (its
// buffer's byteLength: what the tab holds for the model; a WASM heap grows and never shrinks). Emscripten's threaded
// builds create their memory in JavaScript; single-threaded ones export it from the instance. (This runs before
// any engine loads its .wasm: each does so at its first session.)
const heaps = [];
{
  const NativeMemory = WebAssembly.Memory;
  const Recorded = function Memory(descriptor) { const m = new NativeMemory(descriptor); heaps.push(m); return m; };
  Recorded.prototype = NativeMemory.prototype;
  WebAssembly.Memory = Recorded;
  for (const name of ["instantiate", "instantiateStreaming"]) {
    const native = WebAssembly[name];
    WebAssembly[name] = async (...args) => {
      const result = await native.apply(WebAssembly, args);
      for (const value of Object.values((result.instance || result).exports || {})) {
        if (value instanceof NativeMemory && !heaps.includes(value)) heaps.push(value);
      }
      return result;
    };
  }
}
const heapBytes = () => heaps.reduce((sum, m) => sum + m.buffer.byteLength, 0);

const THREADS = Math.max(1, Math.min(navigator.hardwareConcurrency || 1, 8));
for (const build of [ort, ortWebgpu]) {
  build.env.wasm.wasmPaths = "/vendor/onnxruntime-web/dist/";
  build.env.wasm.numThreads = self.crossOriginIsolated ? THREADS : 1;  // threads need SharedArrayBuffer
  build.env.logLevel = "error";
}

let engine = null;     // the loaded engine
let stopped = false;   // set by a "stop" message, read between decode steps

const post = (type, data = {}) => self.postMessage({ type, ...data });
const now = () => performance.now();

// ---- what this browser offers ------------------------------------------------------------------------------
async function capabilities() {
  let adapter = null;
  try { adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null; } catch { adapter = null; }
  const info = adapter ? (adapter.info || {}) : {};
  // A software adapter (SwiftShader, or any fallback adapter) runs WebGPU far slower than WASM: usable, not default.
  const software = !!adapter && (adapter.isFallbackAdapter || info.isFallbackAdapter ||
                                 /swiftshader/i.test(`${info.vendor} ${info.architecture} ${info.description}`));
  return { webgpu: !!adapter, software, shaderF16: !!adapter && adapter.features.has("shader-f16"),
           adapter: adapter ? `${info.vendor || "?"} ${info.architecture || ""}`.trim() : null,
           threads: ort.env.wasm.numThreads, crossOriginIsolated: self.crossOriginIsolated };
}

// ---- downloads with progress (the browser's HTTP cache answers repeat loads) -----------------------------------
async function download(url, label) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const total = Number(response.headers.get("Content-Length")) || 0;
  const reader = response.body.getReader();
  const parts = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    loaded += value.length;
    post("progress", { label, loaded, total });
  }
  const bytes = new Uint8Array(loaded);
  let offset = 0;
  for (const p of parts) { bytes.set(p, offset); offset += p.length; }
  return bytes;
}

const json = async (url) => {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
};

// ---- the chat template and the stopping tokens, the way transformers' apply_chat_template uses them -------------
function renderChat(template, messages, config) {
  const special = {};
  for (const key of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
    const v = config[key];
    special[key] = typeof v === "string" ? v : (v && v.content) || "";
  }
  return new Template(template).render({ messages, add_generation_prompt: true, ...special });
}

// A seeded generator (mulberry32) so that sampling with a seed repeats.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// Greedy at temperature 0; otherwise temperature + nucleus (top-p), as edgepack's Python runners sample.
function pick(logits, temperature, topP, random) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  if (!(temperature > 0)) return best;
  const max = logits[best];
  const probs = new Float64Array(logits.length);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) { probs[i] = Math.exp((logits[i] - max) / temperature); sum += probs[i]; }
  const order = Array.from(probs.keys()).filter((i) => probs[i] / sum > 1e-9).sort((x, y) => probs[y] - probs[x]);
  const keep = [];
  let cumulative = 0;
  for (const i of order) { keep.push(i); cumulative += probs[i] / sum; if (cumulative >= topP) break; }
  const mass = keep.reduce((s, i) => s + probs[i], 0);
  let r = random() * mass;
  for (const i of keep) { r -= probs[i]; if (r <= 0) return i; }
  return keep[keep.length - 1];
}

// ---- onnxruntime-web ---------------------------------------------------------------------------------------
class OrtEngine {
  async load({ base, file, data, device }) {
    const [tokenizerJson, tokenizerConfig, config, generation] = await Promise.all([
      json(`${base}/tokenizer.json`), json(`${base}/tokenizer_config.json`), json(`${base}/config.json`),
      json(`${base}/generation_config.json`).catch(() => ({})),
    ]);
    this.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    this.tokenizerConfig = tokenizerConfig;
    this.template = tokenizerConfig.chat_template;
    const eos = [generation.eos_token_id, config.eos_token_id].flat().filter((x) => Number.isInteger(x));
    const eosText = typeof tokenizerConfig.eos_token === "string" ? tokenizerConfig.eos_token : tokenizerConfig.eos_token?.content;
    if (eosText) eos.push(...this.tokenizer.encode(eosText, { add_special_tokens: false }).ids);
    this.eos = new Set(eos);
    this.layers = config.num_hidden_layers;
    this.kvHeads = config.num_key_value_heads || config.num_attention_heads;
    this.headDim = config.head_dim || config.hidden_size / config.num_attention_heads;
    this.device = device;
    this.ort = device === "webgpu" ? ortWebgpu : ort;
    const model = await download(`${base}/${file}`, file);
    // disable_quant_qdq lets onnxruntime fold DequantizeLinear on weights: q4dq's 4-bit weights become fp32 at load.
    const options = { executionProviders: [device], graphOptimizationLevel: "all",
                      extra: { session: { disable_quant_qdq: "1" } } };
    // A graph with its weights in model*.onnx_data beside it (over protobuf's 2 GB, or int8): the data file is handed
    // over by the name the graph's tensors give as their location, and onnxruntime-web reads each tensor from it.
    if (data) options.externalData = [{ path: data.split("/").pop(), data: await download(`${base}/${data}`, data) }];
    if (device === "webgpu") {
      // The cache stays on the GPU between steps; only the logits come back.
      options.preferredOutputLocation = {};
      for (let i = 0; i < this.layers; i++) {
        options.preferredOutputLocation[`present.${i}.key`] = "gpu-buffer";
        options.preferredOutputLocation[`present.${i}.value`] = "gpu-buffer";
      }
    }
    this.session = await this.ort.InferenceSession.create(model, options);
    const meta = (this.session.inputMetadata || []).find((m) => m.name === "past_key_values.0.key");
    this.cacheType = meta && meta.type === "float16" ? "float16" : "float32";
  }

  encode(messages) {
    const text = renderChat(this.template, messages, this.tokenizerConfig);
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids.map(Number);
  }

  text(ids) { return this.tokenizer.decode(ids, { skip_special_tokens: true }); }

  async *generate(ids, { maxTokens, temperature, topP, seed }) {
    const random = rng(seed);
    const empty = this.cacheType === "float16" ? new Uint16Array(0) : new Float32Array(0);
    let past = [];
    for (let i = 0; i < this.layers; i++) {
      past.push(new this.ort.Tensor(this.cacheType, empty, [1, this.kvHeads, 0, this.headDim]),
                new this.ort.Tensor(this.cacheType, empty, [1, this.kvHeads, 0, this.headDim]));
    }
    let input = ids;
    let position = 0;
    try {
      for (let step = 0; step < maxTokens; step++) {
        const n = input.length;
        const feeds = {
          input_ids: new this.ort.Tensor("int64", BigInt64Array.from(input, BigInt), [1, n]),
          attention_mask: new this.ort.Tensor("int64", new BigInt64Array(position + n).fill(1n), [1, position + n]),
          position_ids: new this.ort.Tensor("int64", BigInt64Array.from({ length: n }, (_, j) => BigInt(position + j)), [1, n]),
        };
        for (let i = 0; i < this.layers; i++) {
          feeds[`past_key_values.${i}.key`] = past[2 * i];
          feeds[`past_key_values.${i}.value`] = past[2 * i + 1];
        }
        const out = await this.session.run(feeds);
        for (const t of past) if (t.location === "gpu-buffer") t.dispose();
        past = [];
        for (let i = 0; i < this.layers; i++) past.push(out[`present.${i}.key`], out[`present.${i}.value`]);
        const vocab = out.logits.dims[2];
        const logits = out.logits.data.subarray((n - 1) * vocab, n * vocab);
        const token = pick(logits, temperature, topP, random);
        yield token;
        if (this.eos.has(token) || stopped) return;
        position += n;
        input = [token];
      }
    } finally {
      for (const t of past) if (t.location === "gpu-buffer") t.dispose();
    }
  }

  async release() { await this.session?.release(); }
}

// ---- wllama (llama.cpp compiled to WASM) ---------------------------------------------------------------------
class WllamaEngine {
  async load({ url }) {
    this.wllama = new Wllama({ default: "/vendor/@wllama/wllama/esm/wasm/wllama.wasm" },
                             { suppressNativeLog: true, allowOffline: true });
    await this.wllama.loadModelFromUrl(url, {
      n_ctx: 2048, n_threads: THREADS, useCache: false,
      progressCallback: ({ loaded, total }) => post("progress", { label: url.split("/").pop(), loaded, total }),
    });
    this.info = this.wllama.getLoadedContextInfo();
    this.template = this.wllama.getChatTemplate();
    if (!this.template) throw new Error(`${url}: the GGUF has no chat template`);
    this.eos = new Set(this.info.list_tokens_eog);
    this.device = this.wllama.isMultithread() ? `wasm, ${this.wllama.getNumThreads()} threads` : "wasm, 1 thread";
  }

  // The GGUF's own chat template, rendered as edgepack's llama.cpp runner renders it; llama.cpp tokenizes the
  // text itself (special tokens parsed, BOS as the file says).
  encode(messages) {
    return renderChat(this.template, messages, this.special || {});
  }

  // Streams {token, piece}; token ids (llama.cpp's, through logprobs) only when asked for: the tests compare them.
  async *generate(prompt, { maxTokens, temperature, topP, seed, wantIds }) {
    const queue = [];
    let wake = null;
    let failure = null;
    const abort = new AbortController();
    const push = (item) => { queue.push(item); if (wake) { wake(); wake = null; } };
    this.wllama.createCompletion({
      prompt, stream: true, max_tokens: maxTokens, temperature, temp: temperature, top_p: topP, seed,
      cache_prompt: false, abortSignal: abort.signal, ...(wantIds ? { logprobs: 1, n_probs: 1 } : {}),
      onData: (chunk) => push(chunk),
    }).then(() => push(null), (e) => { failure = e; push(null); });
    for (;;) {
      if (!queue.length) await new Promise((r) => { wake = r; });
      const chunk = queue.shift();
      if (chunk === null) { if (failure && !stopped) throw failure; return; }
      if (chunk.timings) this.timings = chunk.timings;
      const choice = chunk.choices?.[0];
      if (!choice || (choice.finish_reason && !choice.text && !choice.logprobs)) continue;
      const ids = (choice.logprobs?.content || []).map((c) => c.id);
      yield { token: ids.length ? ids[0] : null, piece: choice.text || "" };
      for (const extra of ids.slice(1)) yield { token: extra, piece: "" };
      if (stopped) abort.abort();
    }
  }

  async release() { await this.wllama?.exit(); }
}

// ---- messages from the page ----------------------------------------------------------------------------------
async function load(request) {
  const start = now();
  await engine?.release();
  engine = null;
  if (request.engine === "wllama") {
    engine = new WllamaEngine();
    engine.special = request.special;  // bos/eos text for templates that use them, from the model's tokenizer
    await engine.load({ url: request.url });
  } else {
    engine = new OrtEngine();
    await engine.load({ base: request.base, file: request.file, data: request.data, device: request.engine });
  }
  engine.kind = request.engine;
  post("loaded", { seconds: (now() - start) / 1000, engine: request.engine, device: engine.device,
                   heapBytes: heapBytes() });
}

async function generate({ messages, maxTokens = 256, temperature = 0, topP = 1, seed = 0, wantIds = false }) {
  stopped = false;
  const start = now();
  const prompt = engine.encode(messages);
  const ids = [];
  const pieces = [];
  let first = null;
  let shown = "";
  let count = 0;
  for await (const item of engine.generate(prompt, { maxTokens, temperature, topP, seed, wantIds })) {
    if (first === null) first = now();
    count += 1;
    let text;
    let token;
    if (engine.kind === "wllama") {
      token = item.token;
      if (token !== null) ids.push(token);
      pieces.push(item.piece);
      text = pieces.join("");
    } else {
      token = item;
      ids.push(token);
      text = engine.text(ids.filter((t) => !engine.eos.has(t)));
    }
    const delta = text.endsWith("\ufffd") ? "" : text.slice(shown.length);  // wait for a whole character
    if (delta) shown = text;
    post("token", { id: token, delta, count, tps: count > 1 ? (count - 1) / ((now() - first) / 1000) : null });
  }
  const end = now();
  post("done", {
    ids, text: shown, stopped, promptTokens: Array.isArray(prompt) ? prompt.length : null,
    count, ttft: first === null ? null : (first - start) / 1000,
    decodeTps: count > 1 ? (count - 1) / ((end - first) / 1000) : null, engineTimings: engine.timings || null,
  });
}

self.onmessage = async ({ data }) => {
  if (data.type === "stop") { stopped = true; return; }
  try {
    if (data.type === "caps") post("caps", await capabilities());
    else if (data.type === "load") await load(data);
    else if (data.type === "generate") await generate(data);
  } catch (e) {
    post("error", { message: String((e && e.message) || e) });
  }
};
