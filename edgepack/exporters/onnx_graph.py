"""A fused ONNX decoder graph written directly from the reference decoder's weights.

Written by hand on purpose (the comment the brief asks for): onnxruntime-genai's model builder writes this kind
of graph, but 0.18 imports transformers 5.x classes while this environment pins transformers 4.57.6
(optimum-onnx 0.1.0 and coremltools need it); optimum's exporter writes an unfused graph (2 min to export,
~8x slower to decode here) that onnxruntime's transformer optimizer does not fuse for Llama's rotary attention.
The graph below is what the builder emits for a CPU/WebGPU decoder, in ~150 lines:

    Gather(embedding) [· scale] → per layer: [Skip]SimplifiedLayerNormalization → MatMul(packed QKV) [+ bias]
    [→ per-head q/k RMSNorm] → GroupQueryAttention(rotary inside, causal, [window,] KV cache in/out) → MatMul(o)
    [→ SimplifiedLayerNormalization] → SkipSimplifiedLayerNormalization → MatMul(gate), MatMul(up)
    → act(gate)·up → MatMul(down) [→ SimplifiedLayerNormalization]
    → final SkipSimplifiedLayerNormalization → MatMul(lm_head) → logits (float32)

Every bracket is a DecoderConfig fact, not a family: the rotary width (GroupQueryAttention reads it from the
cos/sin caches' width), the rotary base per layer (a second cache pair for local layers), the window per layer
(local_window_size), the attention scale, the activation (silu, or gelu tanh as FastGelu), the embedding
scale and the sandwich norms. Norm weights arrive already in their final form ((1 + w) folded by the weight table).

Interface (what transformers.js and onnxruntime-genai feed a decoder): inputs input_ids [batch, seq] int64,
attention_mask [batch, past + seq] int64, position_ids [batch, seq] int64, past_key_values.{i}.key/value
[batch, kv_heads, past, head_dim]; outputs logits [batch, seq, vocab] and present.{i}.key/value. Rotary
positions are position_ids (GroupQueryAttention's own input); the cache's dtype is the graph's float type.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import EdgepackError
from edgepack.model.decoder import Decoder

OPSET = 21
MS = "com.microsoft"


class ExternalData:
    """Initializers written to one external data file while the graph is built, so the graph in memory holds
    only their names and offsets: export memory then grows with the largest tensor, not with the model.

    Written by hand because onnx's own writer (onnx.save with save_as_external_data) needs the whole model in
    memory first. The file follows onnx's external data convention (location / offset / length entries, as
    onnx.external_data_helper writes them); tensors
    under 1 KiB stay inline, as onnx.save's size_threshold does, and tensors of 1 MiB or more start on 64 KiB
    boundaries so runtimes can map them."""

    INLINE = 1024
    ALIGN, ALIGN_FROM = 65536, 1 << 20

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "wb")
        self.size = 0

    def put(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """Write the tensor's data; returns what the graph keeps: a new, data-less TensorProto pointing into the
        file. (Clearing raw_data in place would free nothing: protobuf's upb backend keeps a message's bytes in its
        arena until the whole message is gone.)"""
        data = tensor.raw_data
        if len(data) < self.INLINE:
            return tensor
        if len(data) >= self.ALIGN_FROM and self.size % self.ALIGN:
            pad = self.ALIGN - self.size % self.ALIGN
            self.file.write(b"\0" * pad)
            self.size += pad
        self.file.write(data)
        stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        for key, value in (("location", self.path.name), ("offset", self.size), ("length", len(data))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, str(value)
        stub.data_location = TensorProto.EXTERNAL
        self.size += len(data)
        return stub

    def close(self) -> None:
        self.file.close()


class _Graph:
    """Collects nodes and initializers with unique names. With a store, each initializer goes to disk as it is
    made; with a linear hook, each MatMul weight is handed to it (a quantizer) instead of stored as it is."""

    def __init__(self, float_type: np.dtype, store: ExternalData | None = None, linear_hook=None):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.float = np.dtype(float_type)
        self.elem = helper.np_dtype_to_tensor_dtype(self.float)
        self.store, self.linear_hook = store, linear_hook
        self._names: set[str] = set()
        self._outputs: set[str] = set()

    def add(self, tensor: onnx.TensorProto) -> None:
        if tensor.name in self._names:  # shared by several hooked linears (their input's block sums)
            return
        self._names.add(tensor.name)
        self.inits.append(tensor if self.store is None else self.store.put(tensor))

    def weight(self, name: str, array: np.ndarray, keep_dtype: bool = False) -> str:
        array = np.ascontiguousarray(array, dtype=None if keep_dtype else self.float)
        self.add(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, name: str = "", domain: str = "",
             **attrs) -> list[str]:
        name = name or f"{op}_{len(self.nodes)}"
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        self._outputs.update(outputs)
        return outputs

    def matmul(self, x: str, weight: torch.Tensor, name: str) -> str:
        """x @ weightᵀ (weight [N, K] as torch stores a linear layer) as the node '{name}/MatMul' over the
        initializer '{name}.weight' ([K, N]), or whatever the linear hook makes of it (same output name)."""
        if self.linear_hook is None:
            (out,) = self.node("MatMul", [x, self.weight(name + ".weight", _np(weight).T)], name=name + "/MatMul")
            return out
        out = f"{name}/MatMul/out0"
        nodes, tensors = self.linear_hook(x, weight, name + "/MatMul", name + ".weight", out, self.float)
        for tensor in tensors:
            self.add(tensor)
        for node in nodes:
            if not set(node.output) <= self._outputs:  # a node another linear already added (shared block sums)
                self.nodes.append(node)
                self._outputs.update(node.output)
        return out


def embedding_rows(g: _Graph, table: onnx.NodeProto | None, hidden: int, out: str) -> None:
    """Rows of an embedding table stored as a symmetric 8-bit MatMulNBits' tensors: B [vocab, hidden/block, block]
    uint8 with the implied zero point 128, scales [vocab, hidden/block]. A row is (B[id] - 128) · scale per block:
    Gather → Cast → Sub → Mul(Gather(scales)) → Reshape.

    Written by hand because no converter writes it: onnxruntime's GatherBlockQuantized does this in one node, but
    onnxruntime-web's WASM build has no kernel for it (measured: "Could not find an implementation"). These are
    plain ops every execution provider runs, and none needs fp16, so WebGPU adapters without shader-f16 run it
    (a Gather over an fp16 table does not: "Program Gather requires f16 but the device does not support it")."""
    attrs = {a.name: helper.get_attribute_value(a) for a in table.attribute} if table is not None else {}
    if attrs.get("bits") != 8 or attrs.get("K") != hidden or hidden % attrs["block_size"] or len(table.input) > 3:
        raise EdgepackError("onnx: an 8-bit embedding needs a linear hook that makes lm_head a symmetric 8-bit "
                            "MatMulNBits whose blocks divide the hidden size")
    (q,) = g.node("Gather", [table.input[1], "input_ids"], name="embed")
    (q,) = g.node("Cast", [q], to=g.elem, name="embed/Cast")
    (q,) = g.node("Sub", [q, g.weight("embed/zero_point", np.array(128))], name="embed/Sub")
    (scale,) = g.node("Gather", [table.input[2], "input_ids"], name="embed/scales")
    (scale,) = g.node("Unsqueeze", [scale, g.weight("embed/last_axis", np.array([-1], np.int64), keep_dtype=True)],
                      name="embed/scales/Unsqueeze")
    (rows,) = g.node("Mul", [q, scale], name="embed/Mul")
    g.node("Reshape", [rows, g.weight("embed/shape", np.array([0, 0, hidden], np.int64), keep_dtype=True)], [out],
           name="embed/Reshape")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def rotary_caches(model: Decoder, positions: int, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [positions, rotary_dim/2] from the decoder's own rotary (scaling and attention factor in)."""
    cos, sin = model.rotary(torch.arange(positions), local)
    half = cos.shape[-1] // 2
    return cos[:, :half].numpy(), sin[:, :half].numpy()


def build_decoder_graph(model: Decoder, float_type=np.float32, untie_lm_head: bool = False,
                        embed: str = "float", store: ExternalData | None = None,
                        linear_hook=None) -> onnx.ModelProto:
    """The fused decoder graph for a loaded reference decoder. untie_lm_head stores lm_head as its own
    [hidden, vocab] weight (what a weight quantizer needs); otherwise a tied head reads the embedding transposed.
    embed: how the embedding table is stored.
      "float": in the graph's float type.
      "fp16": in fp16, the gathered rows cast (half the bytes; a token reads one row, so speed does not change).
      "8bit": as symmetric 8-bit MatMulNBits blocks, read by embedding_rows (about 1.1 bytes a value). A tied
              table is the quantized lm_head's own tensors, so the file holds it once; an untied one is quantized
              by the linear hook the same way (as "model.embed_tokens"). Needs a hook that makes lm_head so, or
              one with its own `rows` reader (onnx_web.SmoothInt8: int8 rows with its transforms undone).
    store: write initializers to an external data file as they are made.
    linear_hook(x, weight [N, K] (torch), node name, weight name, output name, float type) -> (nodes, initializers):
    what each linear layer becomes (a weight quantizer, applied one weight at a time)."""
    cfg = model.cfg
    if cfg.rotary_dim % 16:
        raise EdgepackError(f"onnx: a rotary width of {cfg.rotary_dim} (partial_rotary_factor × head_dim) is not one "
                            "onnxruntime's GroupQueryAttention computes (it needs a multiple of 16); export another "
                            "target for this model")
    g = _Graph(float_type, store, linear_hook)
    kvh, heads, dim = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
    past_dims = ["batch_size", kvh, "past_sequence_length", dim]
    present_dims = ["batch_size", kvh, "total_sequence_length", dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", g.elem, past_dims))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", g.elem, present_dims))

    # What GroupQueryAttention needs from the mask: each row's real length - 1, and the total length.
    g.weight("one_i64", np.array([1], dtype=np.int64), keep_dtype=True)
    g.weight("axis1", np.array([1], dtype=np.int64), keep_dtype=True)
    (mask_sum,) = g.node("ReduceSum", ["attention_mask", "axis1"], keepdims=0, name="mask_sum")
    (lengths,) = g.node("Sub", [mask_sum, "one_i64"], name="mask_len_minus_1")
    (seqlens_k,) = g.node("Cast", [lengths], to=TensorProto.INT32, name="seqlens_k")
    (mask_shape,) = g.node("Shape", ["attention_mask"], name="mask_shape", start=1, end=2)
    (total_1d,) = g.node("Cast", [mask_shape], to=TensorProto.INT32, name="total_len_1d")
    g.weight("scalar_shape", np.array([], dtype=np.int64), keep_dtype=True)
    (total_len,) = g.node("Reshape", [total_1d, "scalar_shape"], name="total_sequence_length")

    for prefix, local in (("", False), ("local_", True)):
        if not local or model.local_inv_freq is not None:
            cos, sin = rotary_caches(model, cfg.context_length, local)
            g.weight(f"{prefix}cos_cache", cos)
            g.weight(f"{prefix}sin_cache", sin)

    if embed == "8bit":  # its nodes go here once the 8-bit tensors exist (lm_head's are made last)
        embed_at, x = len(g.nodes), "embed/rows"
    elif embed == "fp16" and g.float != np.float16:
        table = g.weight("model.embed_tokens.weight", _np(model.embed.weight).astype(np.float16), keep_dtype=True)
        (x,) = g.node("Gather", [table, "input_ids"], name="embed")
        (x,) = g.node("Cast", [x], to=g.elem, name="embed/Cast")
    else:
        (x,) = g.node("Gather", [g.weight("model.embed_tokens.weight", _np(model.embed.weight)), "input_ids"],
                      name="embed")
    if cfg.embed_scale != 1.0:
        (x,) = g.node("Mul", [x, g.weight("embed_scale", np.array(cfg.embed_scale))], name="embed/scale")
    eps = cfg.rms_norm_eps
    residual = None
    hidden = x

    def norm(h, res, weight, name):
        """RMSNorm of h (+ res when given); returns (normed, new residual)."""
        w = g.weight(name + ".weight", _np(weight))
        if res is None:
            (out,) = g.node("SimplifiedLayerNormalization", [h, w], name=name, axis=-1, epsilon=eps, stash_type=1)
            return out, h
        out, _, _, summed = g.node("SkipSimplifiedLayerNormalization", [h, res, w], 4, name=name, domain=MS,
                                   epsilon=eps)
        return out, summed

    def plain_norm(h, weight, name):
        w = g.weight(name + ".weight", _np(weight))
        (out,) = g.node("SimplifiedLayerNormalization", [h, w], name=name, axis=-1, epsilon=eps, stash_type=1)
        return out

    def linear(h, weight, name, bias=None):
        out = g.matmul(h, weight, name)
        if bias is not None:
            (out,) = g.node("Add", [out, g.weight(name + ".bias", _np(bias))], name=name + "/Add")
        return out

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        normed, residual = norm(hidden, residual, layer.attn_norm.weight, f"{p}.input_layernorm")
        attn = layer.attn
        qkv_w = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight], 0)
        qkv_b = torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]) if cfg.qkv_bias else None
        qkv = linear(normed, qkv_w, f"{p}.self_attn.qkv_proj", qkv_b)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head of q and k, before the rotary embedding
            g.weight(f"{p}.split", np.array([heads * dim, kvh * dim, kvh * dim], dtype=np.int64), keep_dtype=True)
            q, k, v = g.node("Split", [qkv, f"{p}.split"], 3, name=f"{p}.self_attn.split_qkv", axis=-1)
            g.weight(f"{p}.q_heads", np.array([0, 0, heads, dim], dtype=np.int64), keep_dtype=True)
            g.weight(f"{p}.kv_heads", np.array([0, 0, kvh, dim], dtype=np.int64), keep_dtype=True)
            g.weight(f"{p}.q_flat", np.array([0, 0, heads * dim], dtype=np.int64), keep_dtype=True)
            g.weight(f"{p}.kv_flat", np.array([0, 0, kvh * dim], dtype=np.int64), keep_dtype=True)
            normed_qk = []
            for t, n, module in ((q, "q", attn.q_norm), (k, "k", attn.k_norm)):
                shape, flat = (f"{p}.q_heads", f"{p}.q_flat") if n == "q" else (f"{p}.kv_heads", f"{p}.kv_flat")
                (t,) = g.node("Reshape", [t, shape], name=f"{p}.self_attn.{n}_to_heads")
                t = plain_norm(t, module.weight, f"{p}.self_attn.{n}_norm")
                (t,) = g.node("Reshape", [t, flat], name=f"{p}.self_attn.{n}_from_heads")
                normed_qk.append(t)
            qkv_inputs = [*normed_qk, v]
        else:
            qkv_inputs = [qkv, "", ""]  # packed: GroupQueryAttention splits q, k and v itself
        rope = "local_" if cfg.local_rope(i) else ""
        window = cfg.window(i)
        attn_out, _, _ = g.node(
            "GroupQueryAttention",
            [*qkv_inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
             f"{rope}cos_cache", f"{rope}sin_cache", "position_ids"],
            [f"{p}.self_attn/out", f"present.{i}.key", f"present.{i}.value"],
            name=f"{p}.self_attn.GroupQueryAttention", domain=MS,
            num_heads=heads, kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0, scale=float(cfg.attn_scale),
            # measured on a tiny Gemma 3: onnxruntime's CPU kernel then masks exactly as transformers does
            local_window_size=window or -1,
        )
        hidden = linear(attn_out, attn.o.weight, f"{p}.self_attn.o_proj")
        if cfg.sandwich_norms:
            hidden = plain_norm(hidden, layer.post_attn_norm.weight, f"{p}.post_attention_norm")
        normed, residual = norm(hidden, residual, layer.mlp_norm.weight, f"{p}.pre_feedforward_layernorm")
        mlp = layer.mlp
        gate = linear(normed, mlp.gate.weight, f"{p}.mlp.gate_proj")
        up = linear(normed, mlp.up.weight, f"{p}.mlp.up_proj")
        if cfg.activation == "silu":
            (sig,) = g.node("Sigmoid", [gate], name=f"{p}.mlp.act/Sigmoid")
            (act,) = g.node("Mul", [gate, sig], name=f"{p}.mlp.act/Mul")
        else:  # gelu_pytorch_tanh: FastGelu is onnxruntime's tanh approximation of GELU
            (act,) = g.node("FastGelu", [gate], name=f"{p}.mlp.act/FastGelu", domain=MS)
        (prod,) = g.node("Mul", [act, up], name=f"{p}.mlp.Mul")
        hidden = linear(prod, mlp.down.weight, f"{p}.mlp.down_proj")
        if cfg.sandwich_norms:
            hidden = plain_norm(hidden, layer.post_mlp_norm.weight, f"{p}.post_feedforward_layernorm")

    normed, _ = norm(hidden, residual, model.norm.weight, "model.norm")
    if cfg.tie_word_embeddings and not untie_lm_head:
        (head_t,) = g.node("Transpose", ["model.embed_tokens.weight"], name="lm_head/Transpose", perm=[1, 0])
        (logits,) = g.node("MatMul", [normed, head_t], name="lm_head/MatMul")
    else:
        logits = linear(normed, model.lm_head.weight, "lm_head")
    if g.float != np.float32:
        (logits,) = g.node("Cast", [logits], to=TensorProto.FLOAT, name="logits/Cast")
    g.nodes[-1].output[0] = "logits"
    if embed == "8bit":
        table_node, table = ("lm_head/MatMul", "lm_head.weight") if cfg.tie_word_embeddings else \
            ("model.embed_tokens/MatMul", "model.embed_tokens.weight")
        if cfg.tie_word_embeddings:
            nodes = [n for n in g.nodes if n.name.startswith("lm_head/")]
        else:  # quantized like lm_head; only its tensors are kept
            nodes, tensors = g.linear_hook("input_ids", model.embed.weight, table_node, table, "embed/unused", g.float)
            for tensor in tensors:
                g.add(tensor)
        tail = g.nodes[embed_at:]
        del g.nodes[embed_at:]
        reader = getattr(g.linear_hook, "rows", None)  # a quantizer that reads its own table's rows back
        if reader is not None:
            nodes, tensors = reader(table_node, table, cfg.hidden_size, "embed/rows", g.float)
            for tensor in tensors:
                g.add(tensor)
            g.nodes.extend(nodes)
        else:
            embedding_rows(g, next((n for n in nodes if n.op_type == "MatMulNBits"), None), cfg.hidden_size,
                           "embed/rows")
        g.nodes.extend(tail)

    graph = helper.make_graph(g.nodes, "edgepack-decoder", inputs, outputs, g.inits)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                    producer_name="edgepack")
    model_proto.ir_version = 10
    return model_proto
