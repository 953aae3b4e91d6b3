"""web target: ONNX decoder graphs for onnxruntime-web (WebGPU, WASM) in the folder layout transformers.js loads.

    web/config.json, generation_config.json, tokenizer.json, tokenizer_config.json (chat_template inside)
    web/onnx/model.onnx            fp32
    web/onnx/model_fp16.onnx       fp16 weights and activations, fp16 KV cache
    web/onnx/model_quantized.onnx  q8: MatMulNBits 8-bit blocks of 32, int8 activations per block
    web/onnx/model_q4.onnx         q4: MatMulNBits HQQ 4-bit blocks of 32 (onnxruntime's node quantizers)
    web/onnx/model_q4f16.onnx      q4 weights, fp16 activations and KV cache
    (q8, q4, q4f16: lm_head is llama.cpp's Q8_0 and the embedding reads its rows from those 8-bit blocks, so a tied
    table is stored once and no op needs fp16: WebGPU adapters without shader-f16 run them)
    web/onnx/model_q4dq.onnx       q4's weights as DequantizeLinear → MatMul: a 4-bit download that the runtime
                                   expands to fp32 at load, for WASM (whose MatMulNBits has no fast kernel)
    web/onnx/model_int8.onnx       int8 weights per channel, smoothed and rotated (SmoothInt8), int8 activations per
                                   tensor: one byte a weight in the browser's memory, for WASM when q4dq's fp32
                                   expansion does not fit; its weights in model_int8.onnx_data (the WASM heap
                                   then holds them once)
    web/baseline/onnx/model_q4*.onnx   plain round-to-nearest q4, which validate measures beside ours

The graph comes from onnx_graph.py (fused GroupQueryAttention + SkipSimplifiedLayerNormalization); all
quantization is onnxruntime's own. Memory is bounded by the largest tensor, not the model: the source stays in its
own dtype (bf16: 2 bytes a parameter), and each weight is converted, quantized by onnxruntime's node quantizer and
written to disk before the next is touched (write_graph, LinearQuantizer). A graph over protobuf's 2 GB limit keeps
its weights in model*.onnx_data beside it, as int8 always does; config.json's transformers.js_config names those
files (use_external_data_format), so stock transformers.js fetches the data too, and so does the page.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import numpy as np

from edgepack.artifacts import BASELINE_DIR
from edgepack.errors import EdgepackError
from edgepack.exporters.base import Exporter, register
from edgepack.native import modules_missing
from edgepack.source import Source
from edgepack.targets import TargetSpec

FILE_NAMES = {  # transformers.js dtype -> file name under onnx/
    "fp32": "model.onnx", "fp16": "model_fp16.onnx", "q8": "model_quantized.onnx",
    "q4": "model_q4.onnx", "q4f16": "model_q4f16.onnx", "q4dq": "model_q4dq.onnx", "int8": "model_int8.onnx",
}
PROTOBUF_LIMIT = 2_000_000_000  # bytes; protobuf cannot serialize a message of 2 GiB or more
BLOCK = 32
LM_HEAD = "lm_head/MatMul"  # the node name onnx_graph gives an untied head
HEADS = (LM_HEAD, "model.embed_tokens/MatMul")  # and an untied embedding it quantizes like the head (embed="8bit")


def write_graph(model, path: Path, float_type=np.float32, inline: bool = True, **build) -> list[Path]:
    """Build the decoder graph with its initializers streamed to path's external data file as they are made, then
    save it. A model under protobuf's 2 GB limit becomes one file (what transformers.js loads by default), copied
    from the data file tensor by tensor, unless inline is False; a larger one keeps model*.onnx_data beside it."""
    import onnx

    from edgepack.exporters.onnx_graph import ExternalData, build_decoder_graph

    data = path.with_name(path.name + "_data")
    store = ExternalData(data)
    try:
        proto = build_decoder_graph(model, float_type, store=store, **build)
    finally:
        store.close()
    if inline and store.size < PROTOBUF_LIMIT:
        save_inline(proto, path, data)
        data.unlink()
        return [path]
    onnx.save(proto, path)
    return [path, data]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def save_inline(proto, path: Path, data: Path) -> None:
    """Save a model whose initializers live in `data` as one self-contained .onnx file, one tensor in memory at a
    time. Written by hand because onnx.save needs every tensor loaded into the ModelProto first (the whole model,
    then a second copy as the serialized string). It relies on protobuf's documented merge rule: a message field
    that occurs several times in the stream is merged, its repeated fields concatenated. So the file is the model
    without those tensors, followed by one `graph { initializer { tensor } }` record per tensor, which every
    protobuf parser (onnx, onnxruntime, onnxruntime-web) reads as the same graph with all its initializers."""
    from onnx import ModelProto, TensorProto

    graph_field = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_field = ModelProto.DESCRIPTOR.fields_by_name["graph"].message_type.fields_by_name["initializer"].number
    external = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    kept = [t for t in proto.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    with open(path, "wb") as out, open(data, "rb") as src:
        out.write(proto.SerializeToString())
        for tensor in external:
            where = {entry.key: int(entry.value) for entry in tensor.external_data if entry.key in ("offset", "length")}
            src.seek(where.get("offset", 0))
            inline = TensorProto()
            inline.CopyFrom(tensor)
            inline.ClearField("external_data")
            inline.data_location = TensorProto.DEFAULT
            inline.raw_data = src.read(where["length"])
            body = inline.SerializeToString()
            del inline
            record = _varint(init_field << 3 | 2) + _varint(len(body)) + body
            out.write(_varint(graph_field << 3 | 2) + _varint(len(record)))
            out.write(record)


class LinearQuantizer:
    """A linear hook for build_decoder_graph: onnxruntime's own MatMulNBits node quantizers, applied to one weight
    at a time as the graph is built, so no whole-model copy is ever held (onnxruntime's MatMulNBitsQuantizer
    walks a complete in-memory model, ~4 copies of the weights at its peak). Node by node the result is what the
    whole-model quantizer writes: the same quantizer objects, the same node and initializer names.

    body / head: the quantizer for the transformer layers / for lm_head. split_zero_points: HQQ's float zero points
    rewritten for the int8 kernels (split_float_zero_points). dequantize: the MatMulNBits rewritten as
    DequantizeLinear → MatMul (dequantize_nbits)."""

    SLICE = 1 << 24  # values of the head expanded to float at a time (64 MB in fp32)

    def __init__(self, body, head=None, split_zero_points: bool = False, dequantize: bool = False):
        self.body, self.head = body, head or body
        self.split_zero_points, self.dequantize = split_zero_points, dequantize

    def __call__(self, x: str, weight, node_name: str, weight_name: str, output: str, float_type):
        """weight: torch [N, K]. The head (vocab × hidden, the largest matrix) is quantized in slices of output rows
        and the slices' MatMulNBits tensors concatenated: its round-to-nearest blocks run along K within one output
        row, so slicing by rows gives the same bytes while only one slice is ever expanded to float."""
        from onnx import NodeProto, TensorProto, numpy_helper

        n, k = weight.shape
        rows = max(1, self.SLICE // k) if node_name in HEADS else n
        parts = [self._quantize(x, np.ascontiguousarray(weight[i:i + rows].detach().float().numpy().T, dtype=float_type),
                                node_name, weight_name, output, float_type) for i in range(0, n, rows)]
        graph = parts[0]
        if len(parts) > 1:
            (node,) = graph.node
            for attr in node.attribute:
                if attr.name == "N":
                    attr.i = n
            merged = [numpy_helper.from_array(np.concatenate([numpy_helper.to_array(p.initializer[i]) for p in parts]),
                                              t.name) for i, t in enumerate(graph.initializer)]
            graph.ClearField("initializer")
            graph.initializer.extend(merged)
        proto = self._model(graph)
        if self.split_zero_points:
            split_float_zero_points(proto, float_type)
        if self.dequantize:
            dequantize_nbits(proto)
        # copies, so that nothing keeps this model's protobuf arena (the float weight included) alive
        return ([NodeProto.FromString(node.SerializeToString()) for node in proto.graph.node],
                [TensorProto.FromString(t.SerializeToString()) for t in proto.graph.initializer])

    def _quantize(self, x: str, weight: np.ndarray, node_name: str, weight_name: str, output: str, float_type):
        """One [K, N] weight through onnxruntime's node quantizer; the graph of its nodes and new initializers."""
        import warnings

        from onnx import helper, numpy_helper

        elem = helper.np_dtype_to_tensor_dtype(np.dtype(float_type))
        graph = helper.make_graph([], "linear", [], [helper.make_tensor_value_info(output, elem, None)],
                                  [numpy_helper.from_array(weight, weight_name)])
        matmul = helper.make_node("MatMul", [x, weight_name], [output], name=node_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # HQQ hands torch read-only NumPy views; harmless here
            nodes = (self.head if node_name in HEADS else self.body).quantize(matmul, [graph])
        graph.node.extend(nodes)
        kept = [t for t in graph.initializer if t.name != weight_name]  # make_graph copies them out of this graph
        return helper.make_graph(list(graph.node), "linear", [], list(graph.output), kept)

    @staticmethod
    def _model(graph):
        from onnx import helper

        from edgepack.exporters.onnx_graph import MS, OPSET

        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])


def nbits(bits: int, symmetric: bool):
    """onnxruntime's round-to-nearest MatMulNBits node quantizer, blocks of 32, int8 compute (accuracy_level 4)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    return DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=BLOCK, is_symmetric=symmetric, accuracy_level=4, op_types_to_quantize=("MatMul",), bits=bits))


class Q8_0:
    """lm_head (and the 8-bit embedding that reads it) as llama.cpp's Q8_0: gguf-py's own quantizer (blocks of 32,
    symmetric, scale = max|w| / 127 in fp16), stored as an 8-bit MatMulNBits (B = q + 128, its implied zero point).
    A node quantizer with the interface of onnxruntime's (quantize(node, graph stack) -> nodes, and the same tensor
    names).

    Why not onnxruntime's symmetric 8-bit: it maps each block's extreme to -128 (scale max|w| / 128), a grid one
    step off Q8_0's. Measured on the default model, whose tables are Q8_0 in its GGUF (so Q8_0 is lossless there):
    q4 with onnxruntime's 8-bit head and embedding, top-1 0.940 / KL 0.0039; with Q8_0's, below."""

    def quantize(self, node, graph_stack):
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize
        from onnx import helper, numpy_helper

        graph = graph_stack[-1]
        name = node.input[1]
        weight = numpy_helper.to_array(next(t for t in graph.initializer if t.name == name))  # [K, N]
        k, n = weight.shape
        if k % BLOCK:
            return nbits(8, symmetric=True).quantize(node, graph_stack)
        blocks = quantize(np.ascontiguousarray(weight.T, dtype=np.float32), GGMLQuantizationType.Q8_0)
        blocks = blocks.reshape(n, k // BLOCK, 2 + BLOCK)  # per block: fp16 scale, 32 int8
        scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(weight.dtype)
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        graph.initializer.extend([numpy_helper.from_array(q, name + "_Q8"),
                                  numpy_helper.from_array(scales, name + "_scales")])
        return [helper.make_node("MatMulNBits", [node.input[0], name + "_Q8", name + "_scales"], list(node.output),
                                 name=node.name + "_Q8", domain="com.microsoft", K=k, N=n, bits=8,
                                 block_size=BLOCK, accuracy_level=4)]


def hqq4():
    """onnxruntime's HQQ node quantizer (half-quadratic optimization of each block's scale and zero point), 4-bit,
    blocks of 32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    return HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4, op_types_to_quantize=("MatMul",)))


def split_float_zero_points(proto, float_type) -> None:
    """Rewrite HQQ's float zero points as integer zero points plus a small residual product, in place.

    Written by hand because no tool does it: MatMulNBits runs float zero points only on its slow fp32 path
    (10.7 tok/s for the default model here), integer ones on its int8 kernels (110 tok/s). Per block b of 32
    inputs and output n, (q - z)·s = (q - round(z))·s + (round(z) - z)·s, so
        y = MatMulNBits(x; round(z)) + BlockSums(x) @ R,   R[b, n] = (round(z) - z)·s,
    BlockSums(x) being x summed over each block of 32 (shared by every MatMul reading x). R is stored in fp16
    (+0.5 bit per weight) and cast once at load; the result equals HQQ's up to that rounding.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(float_type))
    nodes, block_sums, dropped = [], {}, set()
    for node in graph.node:
        zero = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        if zero is None or zero.data_type == TensorProto.UINT8:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        blocks = -(-k // block)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks).astype(np.float32)
        zeros = numpy_helper.to_array(zero).reshape(n, blocks).astype(np.float32)
        rounded = np.clip(np.rint(zeros), 0, 15).astype(np.uint8)
        residual = ((rounded - zeros) * scales).T.astype(np.float16)  # [blocks, N]
        if blocks % 2:
            rounded = np.pad(rounded, ((0, 0), (0, 1)))
        dropped.add(zero.name)
        node.input[3] = zero.name + "_u4"
        graph.initializer.append(numpy_helper.from_array((rounded[:, 0::2] | rounded[:, 1::2] << 4), node.input[3]))
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(key, value) for key, value in {**attrs, "accuracy_level": 4}.items())
        x = node.input[0]
        if x not in block_sums:
            graph.initializer.append(numpy_helper.from_array(np.array([0, 0, blocks, block], np.int64), x + "/blocks_shape"))
            graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), x + "/last_axis"))
            nodes.append(helper.make_node("Reshape", [x, x + "/blocks_shape"], [x + "/blocks"], name=x + "/blocks"))
            nodes.append(helper.make_node("ReduceSum", [x + "/blocks", x + "/last_axis"], [x + "/block_sums"],
                                          keepdims=0, name=x + "/block_sums"))
            block_sums[x] = x + "/block_sums"
        out, name = node.output[0], node.name
        node.output[0] = out + "/integer_zero_points"
        nodes.append(node)
        graph.initializer.append(numpy_helper.from_array(residual, name + "/zero_residual"))
        r = name + "/zero_residual"
        if elem != TensorProto.FLOAT16:
            r = name + "/zero_residual_cast"
            nodes.append(helper.make_node("Cast", [name + "/zero_residual"], [r], to=elem, name=r))
        nodes.append(helper.make_node("MatMul", [block_sums[x], r], [out + "/residual"], name=name + "/residual"))
        nodes.append(helper.make_node("Add", [out + "/integer_zero_points", out + "/residual"], [out], name=name + "/add"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    kept = [i for i in graph.initializer if i.name not in dropped]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def q4_quantizer(plain: bool = False, dequantize: bool = False) -> LinearQuantizer:
    """q4 / q4f16. Transformer layers: HQQ 4-bit blocks of 32, run on the int8 kernels (split_float_zero_points);
    lm_head: Q8_0 (llama.cpp's Q4_K_M keeps the output matrix at 6-8 bits too). plain: onnxruntime's
    round-to-nearest symmetric 4-bit everywhere, the floor validate compares with."""
    if plain:
        return LinearQuantizer(nbits(4, symmetric=True))
    return LinearQuantizer(hqq4(), Q8_0(), split_zero_points=True, dequantize=dequantize)


def dequantize_nbits(proto):
    """Rewrite every MatMulNBits(x, B, scales[, zero points]) as MatMul(x, DequantizeLinear(Bq, scales, zp)), in place:
    the same integer weights and scales, stored as blockwise UINT4/UINT8 DequantizeLinear (opset 21, blocks along K).

    Written by hand because no tool does this direction. Why: onnxruntime-web's WASM build has no fast MatMulNBits
    kernel (the default model's q4 decodes at ~2 tok/s there, its fp32 graph at ~18). With constant folding of
    DequantizeLinear allowed (session option session.disable_quant_qdq=1, which every edgepack runner sets), the
    runtime expands these weights to fp32 once at load: a 4-bit download that decodes at fp32 speed.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    dropped, nodes = set(), []

    def packed(values: np.ndarray, bits: int, name: str):
        flat = values.astype(np.uint8).ravel()
        if bits == 8:
            tensor = numpy_helper.from_array(values.astype(np.uint8), name)
        else:
            flat = np.pad(flat, (0, flat.size % 2))
            tensor = helper.make_tensor(name, TensorProto.UINT4, values.shape, (flat[0::2] | flat[1::2] << 4).tobytes(),
                                        raw=True)
        graph.initializer.append(tensor)
        return name

    # split_float_zero_points' residual products fold into the weights too: W += R repeated over each block.
    residual = {n.name[: -len("/residual")]: n for n in graph.node if n.op_type == "MatMul" and n.name.endswith("/residual")}
    skip = set()
    for node in graph.node:
        if node.name in skip:
            continue
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        blocks = -(-k // block)
        raw = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)
        q = raw if bits == 8 else np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(n, -1)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks)
        if len(node.input) > 3 and node.input[3]:
            zp = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1)
            zp = (zp if bits == 8 else np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1))[:, :blocks]
            dropped.add(node.input[3])
        else:  # MatMulNBits' implied zero point for unsigned storage
            zp = np.full((n, blocks), 1 << (bits - 1), np.uint8)
        dropped.update(node.input[1:3])
        name, output = node.name, node.output[0]
        inputs = [packed(q[:, :k].T, bits, name + "/Bq"), name + "/scales", packed(zp.T, bits, name + "/zp")]
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scales.T), name + "/scales"))
        nodes.append(helper.make_node("DequantizeLinear", inputs, [name + "/W"], axis=0, block_size=block,
                                      name=name + "/dequantize"))
        weight = name + "/W"
        extra = residual.get(name)
        if extra is not None and k % block == 0:
            add = next(x for x in graph.node if x.name == name + "/add")
            skip.update({extra.name, add.name})
            r = extra.input[1]  # [blocks, N], float (a Cast of the fp16 initializer, moved up here to stay in order)
            cast = next((x for x in graph.node if x.op_type == "Cast" and x.output[0] == r), None)
            if cast is not None:
                skip.add(cast.name)
                nodes.append(cast)
            graph.initializer.append(numpy_helper.from_array(np.array([blocks, 1, n], np.int64), name + "/r3"))
            graph.initializer.append(numpy_helper.from_array(np.array([blocks, block, n], np.int64), name + "/rb"))
            graph.initializer.append(numpy_helper.from_array(np.array([k, n], np.int64), name + "/rk"))
            nodes += [helper.make_node("Reshape", [r, name + "/r3"], [name + "/R3"], name=name + "/R3"),
                      helper.make_node("Expand", [name + "/R3", name + "/rb"], [name + "/RB"], name=name + "/RB"),
                      helper.make_node("Reshape", [name + "/RB", name + "/rk"], [name + "/RK"], name=name + "/RK"),
                      helper.make_node("Add", [weight, name + "/RK"], [name + "/W_full"], name=name + "/W_full")]
            weight, output = name + "/W_full", add.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [output], name=name))
    # drop what nothing reads any more (the block sums that fed the residual products)
    needed = {o.name for o in graph.output}
    kept_nodes = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept_nodes.append(node)
            needed.update(node.input)
    nodes = kept_nodes[::-1]
    graph.ClearField("node")
    graph.node.extend(nodes)
    kept = [i for i in graph.initializer if i.name not in dropped and i.name in needed]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            opset.version = 21  # blockwise DequantizeLinear and 4-bit types
    return proto


def q8_quantizer() -> LinearQuantizer:
    """q8 (transformers.js' model_quantized.onnx): MatMulNBits 8-bit asymmetric blocks of 32, activations quantized
    to int8 per block at run time (accuracy_level 4); lm_head (and the embedding that reads it) Q8_0. quantize_dynamic's
    per-tensor activation scale measured top-1 0.80 / KL 0.11 on the default model; this, 0.960 / 0.0044."""
    return LinearQuantizer(nbits(8, symmetric=False), Q8_0())


def hadamard(k: int, largest: int = 256) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of the largest power-of-two order (≤ largest) that divides k: the
    block of a block-diagonal rotation of a k-wide input. Symmetric, so it is its own inverse."""
    order = 1
    while order < largest and k % (order * 2) == 0:
        order *= 2
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < order:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(order, dtype=np.float32)


class SmoothInt8:
    """int8 (transformers.js' model_int8.onnx): every linear as onnxruntime's DynamicQuantizeMatMul, 8-bit weights
    per output channel (symmetric, stored as uint8 around a zero point of 128) and the input quantized to 8 bits
    per tensor at run time, the int8 GEMM kernels (MLAS QGEMM)
    that onnxruntime-web's WASM build runs with SIMD; one byte a weight in the browser's memory.

    Plain int8 loses to the activations' outlier channels: top-1 0.805 / KL 0.104 on the default model
    (quantize_dynamic). Two exact transforms of each linear's input fix it, as SmoothQuant and QuaRot do:
      smoothing: x · W = (x / s) · (s W), s = max|x|^a / max|W|^(1-a) per input channel (a = 0.6, maxima from the
        reference decoder on edgepack's calibration text; model/calibrate.py), spreading the outliers into W;
      rotation: (x H) · (H W) with H a block-diagonal Hadamard matrix (blocks of up to 256), which flattens what
        is left.
    Both run on the input at run time (a Mul and a block MatMul: k·256 multiplies against the GEMM's k·n), and
    both are folded into W before it is quantized. Measured on the default model: rotation only 0.895 / 0.033;
    smoothing only 0.885 / 0.035; both 0.960 / 0.0043 (a = 0.5: 0.955 / 0.0058; a = 0.7: 0.950 / 0.0052). The head
    (tied: the embedding table too, its rows read back by `rows`) gets the same treatment.

    Speed: native onnxruntime runs it at q4's speed or better (124 tok/s against q4's 114, default model).
    onnxruntime-web's WASM runs it 1.58x faster than q4dq in Node (25.8 against 16.3 tok/s, 1 thread), and in the
    page 1.37-1.44x (bench --browser: 37.5-39.0 against 27.0-27.3 tok/s) on onnxruntime-web's plain WASM build
    (under ort.all's JSEP build: 0.68x): README, "Why int8 was slower, and what changed".

    Written by hand because no quantizer does it for ONNX: onnxruntime's quantize_dynamic has no smoothing or
    rotation, and its whole-model pass holds every weight."""

    def __init__(self, model, maxima: dict[str, np.ndarray], alpha: float = 0.6):
        import torch

        def colmax(*weights) -> np.ndarray:
            return torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).numpy()

        self.scales: dict[str, tuple[str, np.ndarray]] = {}  # linear name -> (the input's name, s)
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}"
            a, m = layer.attn, layer.mlp
            for names, weights in (((f"{p}.self_attn.qkv_proj",), (a.q.weight, a.k.weight, a.v.weight)),
                                   ((f"{p}.self_attn.o_proj",), (a.o.weight,)),
                                   ((f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), (m.gate.weight, m.up.weight)),
                                   ((f"{p}.mlp.down_proj",), (m.down.weight,))):
                s = self._smoothing(maxima.get(names[0]), colmax(*weights), alpha)
                for name in names:
                    self.scales[name] = (names[0], s)
        self.scales["lm_head"] = ("lm_head", self._smoothing(maxima.get("lm_head"), colmax(model.lm_head.weight), alpha))

    @staticmethod
    def _smoothing(act: np.ndarray | None, wmax: np.ndarray, alpha: float) -> np.ndarray | None:
        if act is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.power(act, alpha) / np.power(wmax, 1 - alpha)
        return np.where(np.isfinite(s) & (s > 0), s, 1.0).astype(np.float32)

    def _input(self, x: str, key: str, s: np.ndarray | None, k: int, float_type):
        """Nodes and tensors that turn x into (x / s) H, named after key so linears that share it share them."""
        from onnx import helper, numpy_helper

        h = hadamard(k)
        b = h.shape[0]
        nodes, tensors = [], []
        if s is not None:
            tensors.append(numpy_helper.from_array((1 / s).astype(float_type), f"{key}/inv_scale"))
            nodes.append(helper.make_node("Mul", [x, f"{key}/inv_scale"], [f"{key}/smoothed"], name=f"{key}/smooth"))
            x = f"{key}/smoothed"
        tensors += [numpy_helper.from_array(h.astype(float_type), f"hadamard_{b}"),
                    numpy_helper.from_array(np.array([0, 0, k // b, b], np.int64), f"blocks_{k}_{b}"),
                    numpy_helper.from_array(np.array([0, 0, k], np.int64), f"flat_{k}")]
        nodes += [helper.make_node("Reshape", [x, f"blocks_{k}_{b}"], [f"{key}/blocks"], name=f"{key}/blocks"),
                  helper.make_node("MatMul", [f"{key}/blocks", f"hadamard_{b}"], [f"{key}/rotated_blocks"],
                                   name=f"{key}/rotate"),
                  helper.make_node("Reshape", [f"{key}/rotated_blocks", f"flat_{k}"], [f"{key}/rotated"],
                                   name=f"{key}/rotated")]
        return f"{key}/rotated", nodes, tensors

    def __call__(self, x: str, weight, node_name: str, weight_name: str, output: str, float_type):
        from onnx import helper, numpy_helper

        name = node_name.rsplit("/", 1)[0]
        key, s = self.scales.get(name, (name, None))
        n, k = weight.shape
        h = hadamard(k)
        q, scale = np.empty((n, k), np.int8), np.empty(n, np.float32)
        rows = max(1, LinearQuantizer.SLICE // k)  # output rows are quantized independently: slices bound the memory
        for i in range(0, n, rows):
            w = weight[i:i + rows].detach().float().numpy()
            if s is not None:
                w = w * s
            w = (w.reshape(len(w), k // h.shape[0], h.shape[0]) @ h).reshape(len(w), k)
            step = np.abs(w).max(1) / 127
            step[step == 0] = 1
            q[i:i + rows] = np.clip(np.rint(w / step[:, None]), -127, 127)
            scale[i:i + rows] = step
        rotated, nodes, tensors = self._input(x, key, s, k, float_type)
        # stored as uint8 with zero point 128 (the same values): with signed weights, MLAS on x86 without VNNI (AVX2)
        # runs u8 x s8 through vpmaddubsw, whose pairwise int16 sums saturate (measured on an AVX2-only EPYC: a tiny
        # model's greedy tokens left the exact result at the first one, 3.3 logits off); u8 x u8 widens to 16 bits
        # first there, and every other kernel (VNNI, WASM) is exact either way
        tensors += [numpy_helper.from_array(np.ascontiguousarray((q.T.astype(np.int16) + 128).astype(np.uint8)),
                                            weight_name + "_int8"),
                    numpy_helper.from_array(scale.astype(float_type), weight_name + "_scale"),
                    numpy_helper.from_array(np.full(n, 128, np.uint8), weight_name + "_zero")]
        nodes.append(helper.make_node("DynamicQuantizeMatMul", [rotated, weight_name + "_int8", weight_name + "_scale",
                                                                weight_name + "_zero"],
                                      [output], name=node_name + "_int8", domain="com.microsoft"))
        return nodes, tensors

    def rows(self, node_name: str, weight_name: str, hidden: int, out: str, float_type):
        """The embedding rows for input_ids, read from the int8 table `__call__` wrote for node_name ([hidden, vocab]
        int8, a scale per row): Gather → Cast → Mul(scale), then the rotation and smoothing undone (H is its own
        inverse): row = (q · scale) H / s. Nodes and tensors, as __call__ returns them."""
        from onnx import helper, numpy_helper

        name = node_name.rsplit("/", 1)[0]
        _, s = self.scales.get(name, (name, None))
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(float_type))
        e = "embed"
        node = helper.make_node
        nodes = [node("Gather", [weight_name + "_int8", "input_ids"], [f"{e}/q"], axis=1, name=f"{e}/q"),
                 node("Transpose", [f"{e}/q"], [f"{e}/q_t"], perm=[1, 2, 0], name=f"{e}/q_t"),
                 node("Cast", [f"{e}/q_t"], [f"{e}/q_u"], to=elem, name=f"{e}/Cast"),
                 node("Sub", [f"{e}/q_u", f"{e}/zero"], [f"{e}/q_f"], name=f"{e}/Sub"),  # the zero point, 128
                 node("Gather", [weight_name + "_scale", "input_ids"], [f"{e}/row_scale"], name=f"{e}/row_scale"),
                 node("Unsqueeze", [f"{e}/row_scale", f"{e}/last_axis"], [f"{e}/row_scale_u"], name=f"{e}/row_scale_u"),
                 node("Mul", [f"{e}/q_f", f"{e}/row_scale_u"], [f"{e}/rotated"], name=f"{e}/Mul")]
        tensors = [numpy_helper.from_array(np.array([-1], np.int64), f"{e}/last_axis"),
                   numpy_helper.from_array(np.array(128, float_type), f"{e}/zero")]
        rotated, more_nodes, more_tensors = self._input(f"{e}/rotated", f"{e}/unrotate", None, hidden, float_type)
        nodes += more_nodes
        tensors += more_tensors
        if s is None:
            nodes.append(helper.make_node("Identity", [rotated], [out], name=f"{e}/rows"))
        else:
            tensors.append(numpy_helper.from_array((1 / s).astype(float_type), f"{e}/inv_scale"))
            nodes.append(helper.make_node("Mul", [rotated, f"{e}/inv_scale"], [out], name=f"{e}/rows"))
        return nodes, tensors


@register
class OnnxWebExporter(Exporter):
    format = "onnx"
    version = "2"  # 2: int8's weights as uint8 around 128 (exact on AVX2 without VNNI), in model_int8.onnx_data

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("onnx", "onnxruntime", "onnx_ir")

    @classmethod
    def notes(cls) -> str:
        return "fused GroupQueryAttention graph; q4 = HQQ 4-bit blocks of 32 on MatMulNBits int8 kernels"

    def __init__(self):
        self._model = None

    def _decoder(self, source: Source, target: TargetSpec):
        if self._model is None:
            from edgepack.model.weights import load_decoder

            self._model = load_decoder(source.path, target.context_length, dtype=None)  # converted tensor by tensor
        return self._model

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        return write_variant(self._decoder(source, target), variant, out, source.path)

    def complete(self, out: Path) -> None:
        """config.json tells transformers.js which graphs keep their weights in model*.onnx_data (it fetches that
        file only when told: `transformers.js_config.use_external_data_format`, per file name, in chunks)."""
        external = {p.name[:-len("_data")]: 1 for p in sorted((out / "onnx").glob("*.onnx_data"))}
        if external:
            path = out / "config.json"
            config = json.loads(path.read_text(encoding="utf-8"))
            config.setdefault("transformers.js_config", {})["use_external_data_format"] = external
            path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    def finish(self) -> None:
        self._model = None
        gc.collect()


def calibration_chunks(folder: Path, length: int = 512) -> list[list[int]]:
    """edgepack's calibration text (chat turns, prose, code, numbers; none of the parity set) in the model's own
    tokens, in chunks of `length`."""
    from importlib import resources

    from tokenizers import Tokenizer

    text = resources.files("edgepack").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    return [ids[i:i + length] for i in range(0, len(ids), length)]


def write_variant(model, variant: str, out: Path, folder: Path | None = None) -> list[Path]:
    """Write one transformers.js dtype of a loaded reference decoder under out/onnx/ (+ its baseline). Every
    weight is converted, quantized and written to disk one at a time (write_graph, LinearQuantizer). folder: the
    source model's (its tokenizer tokenizes the calibration text for int8)."""
    for name in ("onnxruntime.quantization", "root"):  # the quantizers log advice through the root logger
        logging.getLogger(name).setLevel(logging.ERROR)
    path = out / "onnx" / FILE_NAMES[variant]
    if variant == "fp32":
        return write_graph(model, path)
    if variant == "fp16":
        return write_graph(model, path, np.float16)
    if variant == "q8":
        return write_graph(model, path, untie_lm_head=True, embed="8bit", linear_hook=q8_quantizer())
    if variant == "int8":
        from edgepack.model.calibrate import input_maxima

        if folder is None:
            raise EdgepackError("onnx: int8 needs the source folder (its tokenizer, for calibration)")
        quantizer = SmoothInt8(model, input_maxima(model, calibration_chunks(folder)))
        # Its weights beside the graph, always: onnxruntime-web then copies each tensor into the WASM heap once, where
        # a self-contained file is copied in whole, parsed into a second copy and made into tensors, a third (the
        # default model's int8 in the page: heap after load 366 MB as one file, 168 MB with model_int8.onnx_data, for
        # 137 MB of files). A WASM heap never shrinks, so that high-water mark is what the tab keeps.
        return write_graph(model, path, inline=False, untie_lm_head=True, embed="8bit", linear_hook=quantizer)
    if variant == "q4dq":
        return write_graph(model, path, untie_lm_head=True, embed="fp16", linear_hook=q4_quantizer(dequantize=True))
    if variant in ("q4", "q4f16"):
        float_type = np.float16 if variant == "q4f16" else np.float32
        files = write_graph(model, out / BASELINE_DIR / "onnx" / FILE_NAMES[variant], float_type, untie_lm_head=True,
                            linear_hook=q4_quantizer(plain=True))
        return write_graph(model, path, float_type, untie_lm_head=True, embed="8bit",
                           linear_hook=q4_quantizer()) + files
    raise EdgepackError(f"onnx: unknown variant '{variant}'")
