"""android and ios targets, ExecuTorch part: a .pte per variant, lowered to XNNPACK, in the interface ExecuTorch's
own LLM runners load (TextLLMRunner on iOS, LlmModule on Android).

    <target>/executorch/model_fp32.pte     fp32 weights and activations
    <target>/executorch/model_8da4w.pte    int8 dynamic activations, int4 weights in groups of 32 (torchao; the
                                           layers' asymmetric blocks through OffsetLinear), int8 head, fp32 embedding
    <target>/executorch/model_info.json    the interface below, for an app
    <target>/executorch/tokenizer.json     what the runners' tokenizer loader reads

The program has one method, as ExecuTorch's Llama export writes it:
    forward(tokens [1, T] int64, input_pos [1] int64) -> logits [1, vocab] after the last token
T is dynamic, 1..max_seq_len (a longer prompt is prefilled in chunks); input_pos is the cache slot of tokens[0].
The KV cache lives inside the program as mutable buffers, one per layer and K / V ([1, C, kv heads, head dim]),
written by llama::update_cache and attended by llama::custom_sdpa (model/cache.py's CustomOpCache). Constant
methods carry what the runners read: get_max_seq_len, get_max_context_len, get_vocab_size, get_n_layers,
use_kv_cache, use_sdpa_with_kv_cache, enable_dynamic_shape, get_bos_id, get_eos_ids.

Both targets get the same file. Exporting the second target links the first one's .pte when its manifest says it
was made from the same source, context length and exporter version: lowering takes minutes per variant.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from edgepack.artifacts import link_or_copy, read_manifest, write_json
from edgepack.errors import EdgepackError
from edgepack.exporters.base import Exporter, register, reusable_entries
from edgepack.model.cache import CustomOpCache
from edgepack.model.offset_linear import with_offset_linears
from edgepack.model_info import MODEL_INFO, eos_ids, executorch_info
from edgepack.native import modules_missing, quiet_stderr
from edgepack.source import Source
from edgepack.targets import TargetSpec, format_targets

FOLDER = "executorch"
MAX_SEQ_LEN = 128  # the longest chunk one forward call takes: export_llama's default
GROUP_SIZE = 32  # export_llama's -G for 8da4w
FILE_NAMES = {"pte-fp32": "model_fp32.pte", "pte-8da4w": "model_8da4w.pte"}


def tanh_gelu(x):
    """GELU's tanh approximation, spelled out: XNNPACK's GELU in ExecuTorch 1.5 ignores approximate="tanh" and
    computes erf GELU (measured on the tiny gemma3: max|Δlogit| 1.5e-3 lowered, 4e-6 eager); tanh lowers exactly."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


class LlmProgram(nn.Module):
    """The reference decoder with ExecuTorch's LLM interface (see the module docstring)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        if model.cfg.activation == "gelu_pytorch_tanh":
            for layer in model.layers:
                layer.mlp.act = tanh_gelu
        if model.lm_head.weight is model.embed.weight:
            # The same table as a Parameter of its own: ExecuTorch deep-copies a parameter that a delegated node (the
            # head, XNNPACK) shares with one left outside (the embedding's gather); over the same storage it is two
            # parameters and no copy (1 GB at Llama-3.2-1B's table; the same logits).
            model.lm_head.weight = nn.Parameter(model.embed.weight.detach(), requires_grad=False)
        _, _, kv_heads, capacity, head_dim = model.cache_shape()
        self.layers = model.cfg.num_layers
        for i in range(self.layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(1, capacity, kv_heads, head_dim), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(1, capacity, kv_heads, head_dim), persistent=False)

    def forward(self, tokens, input_pos):
        steps = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + steps <= self.k_cache_0.shape[1])
        cache = CustomOpCache([getattr(self, f"k_cache_{i}") for i in range(self.layers)],
                              [getattr(self, f"v_cache_{i}") for i in range(self.layers)], start, steps)
        hidden = self.model.hidden(tokens, start + torch.arange(steps), cache)
        return self.model.lm_head(hidden[:, -1])


def quantize_8da4w(model):
    """int8 dynamic activations (per token) with int4 weights in groups of 32: torchao's
    Int8DynamicActivationIntxWeightConfig, ExecuTorch's 8da4w recipe, which XNNPACK runs as qd8-f32-qb4w kernels.

    XNNPACK's int4 is symmetric, and plain symmetric int4 loses too much (default model: top-1 0.645, KL 0.58; with
    torchao's asymmetric integer zero points and an int8 head 0.685 / 0.36). So the transformer layers go through
    OffsetLinear (model/offset_linear.py: asymmetric blocks as symmetric int4 plus fp32 per-block offsets), whose
    symmetric part torchao's SYMMETRIC_NO_CLIPPING_ERR mapping reads back exactly (scale = s: every block spans
    q = 0..15), and the head is int8 per channel (8da8w): top-1 0.915, KL 0.022. The embedding stays fp32."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    model = with_offset_linears(model, inplace=True)  # the caller's freshly loaded model: no second copy
    # The layers first: their fp32 weights are freed as they are quantized, before the head's copy and its
    # quantization's fp32 temporaries (each the size of the vocabulary table) are made. Head first, the 1.24B model
    # peaked at 9.05 GB here.
    quantize_(model, Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE),
        weight_mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR), filter_fn=lambda _, name: name.endswith(".linear"))
    if model.cfg.tie_word_embeddings:  # the head gets its own (quantized) weight; the embedding stays fp32
        model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone())
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
              filter_fn=lambda _, name: name == "lm_head")
    return model


def lower(build, path: Path, metadata: dict, max_seq_len: int) -> Path:
    """torch.export with a dynamic token count, XNNPACK partitioner, ExecuTorch program at path. build() makes the
    model here, so that no caller keeps its weights alive once the exported program holds them."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    program = LlmProgram(build()).eval()
    steps = torch.export.Dim("tokens", min=1, max=max_seq_len)
    sample = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]))
    with torch.no_grad(), warnings.catch_warnings():
        # torch's deprecations inside executorch's own ops, and "mutation on a buffer" (the KV cache, meant)
        warnings.simplefilter("ignore")
        exported = torch.export.export(program, sample, dynamic_shapes=({1: steps}, None), strict=False)
    del program
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pte-spill-", dir=path.parent) as spill, \
            _named_data_on_disk(Path(spill)), _weights_shared_with_preprocess(), quiet_stderr(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()], constant_methods=metadata,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        del exported
        done = edge.to_executorch(ExecutorchBackendConfig(
            passes=[], memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))
        with open(path, "wb") as fh:  # streamed: `done.buffer` joins the program into one more copy (+2.5 GB at 494M)
            done.write_to_file(fh)
        del done, edge  # their file-backed blobs go before the folder does
    return path


@contextmanager
def _weights_shared_with_preprocess():
    """ExecuTorch deep-copies every partition's program before its backend preprocesses it, all partitions at once
    ("in case backends change graph inside preprocess"; BackendDetails.copy_exported_program_for_preprocess, a hook
    meant to be overridden): with the weights, one more copy of the model. XNNPACK's preprocess reads the weights into
    its blobs and writes none of them, so this copy keeps the graphs apart and shares the tensors. Measured on the
    494M model's pte-fp32: the same file, byte for byte.

    Only a tensor that is all of its storage is shared. XNNPACK serializes a weight from its storage's first byte
    (`untyped_storage().data_ptr()`, the storage offset ignored), so a view such as Phi-3's q / k / v rows of the
    fused qkv_proj must still be copied (a Parameter's deepcopy is a compact clone) or it serializes the wrong rows:
    the tiny phi3's logits were off by 8 when it was shared."""
    import copy

    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    def whole(t) -> bool:
        return (isinstance(t, torch.Tensor) and t.storage_offset() == 0
                and t.untyped_storage().nbytes() == t.numel() * t.element_size())

    def graph_copy(cls, program, compile_specs):
        tensors = [*program.state_dict.values(), *program.constants.values()]
        return copy.deepcopy(program, {id(t): t for t in tensors if whole(t)})

    with mock.patch.object(XnnpackBackend, "copy_exported_program_for_preprocess", classmethod(graph_copy)):
        yield


@contextmanager
def _named_data_on_disk(folder: Path):
    """Each blob a delegate adds to ExecuTorch's NamedDataStore goes to a file under folder, as ExecuTorch's own
    FileBackedData, which the serializer copies to the .pte in chunks. XNNPACK's lowering adds every weight as
    bytes (`bytes(array)` in its node visitor, ExecuTorch 1.5) and the store holds them until the program is
    written: one more copy of the model in memory. No option of ExecuTorch's does this, hence the patch, for the
    duration of one lowering. Measured on the 494M model's pte-fp32: peak 7.03 → 5.60 GB, the file byte-identical."""
    from executorch.exir._serialize._cord import FileBackedData
    from executorch.exir._serialize._named_data_store import NamedDataStore

    add, count = NamedDataStore.add_named_data, itertools.count()

    def add_on_disk(self, key, data, alignment=1, external_tag=None, tensor_layout=None):
        if isinstance(data, bytes):
            blob = folder / f"{next(count)}.bin"
            blob.write_bytes(data)
            data = FileBackedData(str(blob), cleanup=True, sha256=hashlib.sha256(data).digest())
        return add(self, key, data, alignment, external_tag, tensor_layout)

    with mock.patch.object(NamedDataStore, "add_named_data", add_on_disk):
        yield


def metadata(cfg, eos: list[int], bos: int | None, max_seq_len: int) -> dict:
    """The constant methods ExecuTorch's LLM runners read (export_llama's names)."""
    values = {"get_max_seq_len": max_seq_len, "get_max_context_len": cfg.context_length,
              "get_vocab_size": cfg.vocab_size, "get_n_layers": cfg.num_layers, "use_kv_cache": True,
              "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True, "get_eos_ids": eos}
    return values | ({"get_bos_id": bos} if bos is not None else {})


@register
class ExecuTorchExporter(Exporter):
    format = "executorch"
    version = "1"
    # pte-fp32 lowered after pte-8da4w in one process held 9.3 GB at 1.24B (alone: 6.7 GB): what torch.export and
    # the XNNPACK lowering leave resident stacks
    independent_variants = True

    @classmethod
    def unavailable(cls) -> str | None:
        return modules_missing("executorch", "torchao")

    @classmethod
    def notes(cls) -> str:
        return (f"torch.export + XNNPACK partitioner, forward(tokens ≤ {MAX_SEQ_LEN}, input_pos) with the KV cache "
                f"inside (llama:: custom ops); 8da4w by torchao (int4 groups of {GROUP_SIZE})")

    def write_shared(self, source: Source, out: Path, target: TargetSpec) -> None:
        super().write_shared(source, out, target)
        (out / FOLDER).mkdir(exist_ok=True)
        shutil.copyfile(source.path / "tokenizer.json", out / FOLDER / "tokenizer.json")

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        if variant not in FILE_NAMES:
            raise EdgepackError(f"executorch: unknown variant '{variant}'; valid: {', '.join(FILE_NAMES)}")
        from edgepack.model.config import DecoderConfig, read_config
        from edgepack.model.weights import load_decoder

        path = out / FOLDER / FILE_NAMES[variant]
        config = read_config(source.path)
        cfg = DecoderConfig.from_hf(config, target.context_length)
        # a chunk never longer than the cache: torch.export proves tokens ≤ context_length from the cache's shape
        # and refuses a wider dynamic range ("Constraints violated (tokens)") for a short context
        max_seq_len = min(MAX_SEQ_LEN, cfg.context_length)
        eos = eos_ids(source.path)
        write_json(out / FOLDER / MODEL_INFO, executorch_info(cfg, max_seq_len, eos, FILE_NAMES))
        if _link_sibling(source, variant, out, target, path):
            return [path]
        def build():
            model = load_decoder(source.path, target.context_length)
            return quantize_8da4w(model) if variant == "pte-8da4w" else model

        bos = config.get("bos_token_id")
        return [lower(build, path, metadata(cfg, eos, bos if isinstance(bos, int) else None, max_seq_len), max_seq_len)]


def _link_sibling(source: Source, variant: str, out: Path, target: TargetSpec, path: Path) -> bool:
    """Hard-link (or copy) the same .pte from the other target's folder when it is still exactly what this export
    would write (the test export_target applies to a target's own old files); True when it did."""
    for other in set(format_targets("executorch")) - {target.name}:
        sibling = out.parent / other
        entry = reusable_entries(read_manifest(sibling), source, target, "executorch", sibling).get(variant)
        if entry:
            link_or_copy(sibling / entry["files"][0]["path"], path)
            return True
    return False
