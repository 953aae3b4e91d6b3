"""web target: ONNX decoder graphs for onnxruntime-web (WebGPU, WASM) in the folder layout transformers.js loads.

    web/config.json, generation_config.json, tokenizer.json, tokenizer_config.json (chat_template inside)
    web/onnx/model.onnx            fp32
    web/onnx/model_fp16.onnx       fp16 weights and activations, fp16 KV cache
    web/onnx/model_quantized.onnx  q8: dynamic int8 (onnxruntime.quantization.quantize_dynamic, per channel)
    web/onnx/model_q4.onnx         q4: MatMulNBits 4-bit blocks of 32 (onnxruntime's MatMulNBitsQuantizer)
    web/onnx/model_q4f16.onnx      q4 weights, fp16 activations and KV cache
    web/onnx/model_q4dq.onnx       q4's weights as DequantizeLinear → MatMul: a 4-bit download that the runtime
                                   expands to fp32 at load, for WASM (whose MatMulNBits has no fast kernel)
    web/baseline/onnx/model_q4*.onnx   plain round-to-nearest q4, which validate measures beside ours

The graph comes from onnx_graph.py (fused GroupQueryAttention + SkipSimplifiedLayerNormalization); all
quantization is onnxruntime's own. A graph over protobuf's 2 GB limit is saved with its weights in
model*.onnx_data beside it, which transformers.js loads with use_external_data_format.
"""

from __future__ import annotations

import gc
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
    "q4": "model_q4.onnx", "q4f16": "model_q4f16.onnx", "q4dq": "model_q4dq.onnx",
}
PROTOBUF_LIMIT = 2_000_000_000  # bytes; protobuf cannot serialize a message of 2 GiB or more
BLOCK = 32
LM_HEAD = "lm_head/MatMul"  # the node name onnx_graph gives an untied head


def save_model(proto, path: Path) -> list[Path]:
    """Save a graph; weights go to an external data file beside it when the graph would pass protobuf's limit."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if _fits(proto):
        onnx.save(proto, path)
        return [path]
    data = path.with_name(path.name + "_data")
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    return [path, data]


def _fits(proto) -> bool:
    """Whether the serialized graph stays under protobuf's limit (ByteSize itself overflows past 2 GiB)."""
    total = sum(len(t.raw_data) for t in proto.graph.initializer)
    return total < PROTOBUF_LIMIT


def _nbits(proto, bits: int, symmetric: bool, include: list[str] | None = None, exclude: list[str] | None = None):
    """onnxruntime's round-to-nearest MatMulNBits quantizer, blocks of 32, int8 compute (accuracy_level 4)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=symmetric, accuracy_level=4,
                                          op_types_to_quantize=("MatMul",), bits=bits)
    quantizer = MatMulNBitsQuantizer(proto, block_size=BLOCK, is_symmetric=symmetric, accuracy_level=4,
                                     nodes_to_include=include, nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _hqq(proto, exclude: list[str]):
    """onnxruntime's HQQ quantizer (half-quadratic optimization of each block's scale and zero point), 4-bit, 32."""
    import warnings

    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(proto, block_size=BLOCK, is_symmetric=False, nodes_to_exclude=exclude,
                                     algo_config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # HQQ hands torch read-only NumPy views; harmless here
        quantizer.process()
    return quantizer.model.model


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


def quantize_q4(proto, float_type, plain: bool = False):
    """q4 / q4f16. Transformer layers: HQQ 4-bit blocks of 32, run on the int8 kernels (split_float_zero_points);
    lm_head: 8-bit blocks of 32 (llama.cpp's Q4_K_M keeps the output matrix at 6-8 bits too). plain: onnxruntime's
    round-to-nearest symmetric 4-bit everywhere, the floor validate compares with."""
    if plain:
        return _nbits(proto, 4, symmetric=True)
    proto = _hqq(proto, exclude=[LM_HEAD])
    proto = _nbits(proto, 8, symmetric=True, include=[LM_HEAD])
    split_float_zero_points(proto, float_type)
    return proto


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


def quantize_q8(proto):
    """q8 (transformers.js' model_quantized.onnx): MatMulNBits 8-bit asymmetric blocks of 32, activations quantized
    to int8 per block at run time (accuracy_level 4), like llama.cpp's Q8_0. quantize_dynamic's per-tensor
    activation scale measured top-1 0.80 / KL 0.11 on the default model; this, 0.955 / 0.0044."""
    return _nbits(proto, 8, symmetric=False)


@register
class OnnxWebExporter(Exporter):
    format = "onnx"
    version = "1"

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

            self._model = load_decoder(source.path, target.context_length)
        return self._model

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        return write_variant(self._decoder(source, target), variant, out)

    def finish(self) -> None:
        self._model = None
        gc.collect()


def write_variant(model, variant: str, out: Path) -> list[Path]:
    """Write one transformers.js dtype of a loaded reference decoder under out/onnx/ (+ its baseline)."""
    from edgepack.exporters.onnx_graph import build_decoder_graph

    for name in ("onnxruntime.quantization", "root"):  # the quantizers log advice through the root logger
        logging.getLogger(name).setLevel(logging.ERROR)
    path = out / "onnx" / FILE_NAMES[variant]
    if variant == "fp32":
        return save_model(build_decoder_graph(model), path)
    if variant == "fp16":
        return save_model(build_decoder_graph(model, np.float16), path)
    if variant == "q8":
        return save_model(quantize_q8(build_decoder_graph(model, untie_lm_head=True, embed_fp16=True)), path)
    if variant == "q4dq":
        q4 = quantize_q4(build_decoder_graph(model, np.float32, untie_lm_head=True, embed_fp16=True), np.float32)
        return save_model(dequantize_nbits(q4), path)
    if variant in ("q4", "q4f16"):
        float_type = np.float16 if variant == "q4f16" else np.float32
        plain = quantize_q4(build_decoder_graph(model, float_type, untie_lm_head=True), float_type, plain=True)
        files = save_model(plain, out / BASELINE_DIR / "onnx" / FILE_NAMES[variant])
        del plain
        ours = quantize_q4(build_decoder_graph(model, float_type, untie_lm_head=True, embed_fp16=True), float_type)
        return save_model(ours, path) + files
    raise EdgepackError(f"onnx: unknown variant '{variant}'")
