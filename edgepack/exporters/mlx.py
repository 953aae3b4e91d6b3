"""mac target: folders that mlx-lm loads (config.json with its quantization block, safetensors in MLX's layout,
tokenizer and chat template), written by mlx-lm's own converter, so MLX quantizes: never by hand.

mlx-lm runs in an environment of its own (edgepack.tools.mlx_python): it needs transformers >= 5.7, edgepack's
stack 4.57.6. Each variant is a complete folder, mac/<variant>/, because mlx_lm.load() takes one folder.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from edgepack.errors import EdgepackError
from edgepack.exporters.base import Exporter, register
from edgepack.source import Source
from edgepack.targets import TargetSpec
from edgepack.tools import MLX, mlx_python

GROUP_SIZE = 64  # mlx-lm's default, and what the mlx-community models use
# variant -> (dtype, bits). float16 activations and scales for the quantized ones: what Apple GPUs run fastest (M1
# has no native bf16); bf16 for a user who wants the source's range.
VARIANTS = {"fp16": ("float16", None), "bf16": ("bfloat16", None), "q8": ("float16", 8), "q4": ("float16", 4)}
Q4_RECIPE = "mixed_4_6"
HEAD_BITS = 6

# Runs in the MLX environment: mlx_lm.convert, the converter behind `mlx_lm convert`, called as a function because
# q4 passes a predicate. q4 is mlx-lm's own mixed_4_6 recipe (4 bits; v_proj and down_proj of a third of the layers
# and the head at 6, its analogue of llama.cpp's Q4_K_M), with a tied embedding, which is also the head, at 6 bits
# too, as llama.cpp keeps its output tensor at Q6_K. Measured on the default model, top-1 / KL: plain 4-bit g64
# 0.655 / 0.465, g32 0.695 / 0.343, mixed_4_6 0.690 / 0.338, mixed_4_6 + 6-bit tied head 0.795 / 0.231 (8-bit head:
# 0.785 / 0.223; mlx-lm's GPTQ on edgepack's calibration text 0.640 / 0.452); llama.cpp Q4_0 0.775 / 0.218.
_CONVERT = """
import json, sys
from mlx_lm import convert
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.utils import load
source, folder, dtype, bits, group, recipe, head_bits = sys.argv[1:8]
predicate = None
if recipe:
    model, _ = load(source, lazy=True)
    mixed = mixed_quant_predicate_builder(recipe, model, int(group))
    tied = json.load(open(source + "/config.json")).get("tie_word_embeddings", False)

    def predicate(path, module):
        if tied and path.endswith("embed_tokens"):
            return {"group_size": int(group), "bits": int(head_bits), "mode": "affine"}
        return mixed(path, module)
convert(source, mlx_path=folder, dtype=dtype, quantize=bits != "0", q_bits=int(bits) or None, q_group_size=int(group),
        quant_predicate=predicate)
"""


@register
class MlxExporter(Exporter):
    format = "mlx"
    version = "1"

    @classmethod
    def notes(cls) -> str:
        return f"converted by mlx-lm's convert ({MLX}, own environment in the tools cache)"

    def export_variant(self, source: Source, variant: str, out: Path, target: TargetSpec) -> list[Path]:
        python = mlx_python()
        if python is None:
            raise EdgepackError(f"mac: {MLX} cannot be installed on this machine (see the line above); "
                                "export other targets with --target")
        folder = out / variant
        dtype, bits = VARIANTS[variant]
        done = subprocess.run([str(python), "-I", "-c", _CONVERT, str(source.path), str(folder), dtype, str(bits or 0),
                               str(GROUP_SIZE), Q4_RECIPE if bits == 4 else "", str(HEAD_BITS)],
                              capture_output=True, text=True)
        weights = sorted(folder.glob("*.safetensors"))
        if done.returncode != 0 or not weights:
            lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("[INFO]")]
            raise EdgepackError(f"mac: mlx-lm could not convert {source.path} to {variant} "
                                f"({(lines or ['no output'])[-1][:200]})")
        (folder / "README.md").unlink(missing_ok=True)  # mlx-lm's Hub model card, which names no model here
        _short_rope_factors(folder / "config.json", target.context_length)
        # The model file first: runners and the manifest read files[0] as the model.
        return weights + sorted(p for p in folder.iterdir() if p.is_file() and p not in weights)


def _short_rope_factors(config_path: Path, context_length: int) -> None:
    """LongRoPE (Phi-3.5 / Phi-4-mini): mlx-lm 0.32's SuScaledRoPE always rotates with long_factor, while the model
    (transformers, llama.cpp, edgepack's decoder) uses short_factor up to original_max_position_embeddings. Within a
    target context that fits there, the folder's long_factor is set to short_factor, so mlx-lm computes what the
    model does (measured on the tiny phi3: top-1 0.06 before, equal to the reference after). No library does this;
    mlx-lm reads the factors from config.json."""
    config = json.loads(config_path.read_text())
    scaling = config.get("rope_scaling") or {}
    original = config.get("original_max_position_embeddings")
    if scaling.get("type", scaling.get("rope_type")) in ("longrope", "su") and original and context_length <= original:
        scaling["long_factor"] = scaling["short_factor"]
        config_path.write_text(json.dumps(config, indent=4))
