"""model_info.json, the contract between the mobile exporters, their runners and the app samples: one home.

The tflite and coreml exporters write it beside their models; edgepack's LiteRT and Core ML runners and the
Kotlin / Swift samples (mobile/templates) read it. Its fields are built here and nowhere else.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepack.errors import EdgepackError

MODEL_INFO = "model_info.json"


def read_model_info(folder: Path, target: str) -> dict:
    """A target folder's model_info.json, or one error line saying how to get it back."""
    path = Path(folder) / MODEL_INFO
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgepackError(f"{path}: missing; re-export the {target} target") from None
    except ValueError as exc:
        raise EdgepackError(f"{path}: not valid JSON ({exc}); re-export the {target} target") from None


def eos_ids(folder: Path) -> list[int]:
    """The end-of-turn ids a source folder's generation_config.json names (for the model_info.json apps read)."""
    gen = folder / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    return [eos] if isinstance(eos, int) else list(eos or [])


def input_names(layers: int, with_length: bool) -> list[str]:
    return ["tokens", "position", *(["length"] if with_length else []),
            *[f"k_{i}" for i in range(layers)], *[f"v_{i}" for i in range(layers)]]


def tflite_info(cfg, prefill_length: int, eos_ids: list[int], files: dict[str, str],
                windows: dict[str, int]) -> dict:
    """android/model_info.json: the .tflite signatures (see exporters/tflite.py), read by the runner and EdgepackLlm.kt."""
    cache = [1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim]
    layers = cfg.num_layers

    def signature(steps, with_length):
        shapes = {"tokens": [1, steps], "position": [1], **({"length": [1]} if with_length else {})}
        shapes |= {name: cache for name in input_names(layers, with_length)[len(shapes):]}
        return {
            "inputs": {n: {"shape": s, "dtype": "float32" if n[0] in "kv" else "int32"} for n, s in shapes.items()},
            "outputs": {"logits": {"shape": [1, cfg.vocab_size], "dtype": "float32"},
                        "k_new": {"shape": [layers, 1, cfg.num_kv_heads, steps, cfg.head_dim], "dtype": "float32"},
                        "v_new": {"shape": [layers, 1, cfg.num_kv_heads, steps, cfg.head_dim], "dtype": "float32"}},
        }

    return {
        "format": "tflite", "family": cfg.family, "context_length": cfg.context_length,
        "prefill_length": prefill_length, "num_layers": layers, "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "eos_token_ids": eos_ids,
        "signatures": {"prefill": signature(prefill_length, True), "decode": signature(1, False),
                       **{name: signature(1, False) for name in windows}},
        "decode_windows": windows,
        "usage": ("Prompt longer than prefill_length: call prefill on chunks of it with position = chunk start. "
                  "prefill pads tokens after `length`. After each call write k_new[l][:, :, :n] / v_new[l] into "
                  "inputs k_l / v_l at slots position..position+n-1 (n = length, or 1 for decode); the graph "
                  "reads the cache, it does not return it. Decode with the smallest decode_<S> in decode_windows "
                  "whose S >= position (it reads only the first S slots), else decode (the whole cache)."),
        "files": files,
    }


def coreml_info(cfg, eos_ids: list[int], files: dict[str, list[str]], chunks: list[range]) -> dict:
    """ios/model_info.json: the ML Program's interface (see exporters/coreml.py), read by the runner and
    EdgepackLlm.swift. A model over the exporter's CHUNK_PARAMS is a chain of packages, each with its own layers'
    cache as state: `chunks` gives each one's interface, `files` each variant's packages in order."""
    def state(layers: int) -> dict:
        shape = [layers, 1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim]
        return {"k_cache": {"shape": shape, "dtype": "float16"}, "v_cache": {"shape": shape, "dtype": "float16"}}

    mask = {"causal_mask": {"shape": [1, 1, "T", "E"], "dtype": "float16"}}
    ids = {"input_ids": {"shape": [1, "T"], "dtype": "int32"}}
    hidden = {"shape": [1, "T", cfg.hidden_size], "dtype": "float16"}
    logits = {"logits": {"shape": [1, "T", cfg.vocab_size], "dtype": "float16"}}
    info = {
        "format": "coreml", "family": cfg.family, "minimum_deployment_target": "iOS18 / macOS15",
        "context_length": cfg.context_length, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
        "eos_token_ids": eos_ids,
        "inputs": ids | mask, "outputs": logits, "states": state(cfg.num_layers),
        "usage": ("T = new tokens this call (the prompt for prefill, 1 for decode), E = tokens cached after it "
                  f"(≤ {cfg.context_length}). causal_mask[0, 0, t, e] = 0 when e ≤ E − T + t, else -65504. Create "
                  "the state once per conversation (MLModel.makeState()) and pass it to every prediction."),
        "files": {v: names[0] for v, names in files.items()},
    }
    if len(chunks) == 1:
        return info
    info["chunks"] = [{"layers": [c.start, c.stop],
                       "inputs": (ids if c.start == 0 else {"hidden_in": hidden}) | mask,
                       "outputs": logits if c.stop == cfg.num_layers else {"hidden_out": hidden},
                       "states": state(len(c))} for c in chunks]
    info["files"] = files
    info["usage"] += (f" This model is a chain of {len(chunks)} packages (files: each variant's, in order): call "
                      "them in turn with the same causal_mask, the first with input_ids, each next one with the "
                      "previous one's hidden_out as hidden_in; the last returns logits. Each package has its own "
                      "state (its layers' cache): make one per package per conversation.")
    return info


def litertlm_info(cfg, prefill_length: int, files: dict[str, str]) -> dict:
    """android/litertlm/model_info.json: the signatures inside each .litertlm (see exporters/litertlm.py)."""
    cache = {"shape": [1, cfg.num_kv_heads, cfg.context_length, cfg.head_dim], "dtype": "float32"}
    caches = {f"kv_cache_{kind}_{i}": cache for kind in "kv" for i in range(cfg.num_layers)}

    def ids(steps):
        return {"tokens": {"shape": [1, steps], "dtype": "int32"}, "input_pos": {"shape": [steps], "dtype": "int32"}}

    return {
        "format": "litertlm", "family": cfg.family, "context_length": cfg.context_length,
        "prefill_length": prefill_length, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
        "signatures": {
            f"prefill_{prefill_length}": {"inputs": ids(prefill_length) | caches, "outputs": caches},
            "decode": {"inputs": ids(1) | caches,
                       "outputs": {"logits": {"shape": [1, 1, cfg.vocab_size], "dtype": "float32"}} | caches}},
        "usage": ("Load the .litertlm with LiteRT-LM (Engine / Conversation); it holds the tokenizer, chat template "
                  "and stop tokens. Driving the .tflite by hand: tokens at input_pos (prefill padded with position "
                  "0), each call returns every cache whole, fed back as the next call's inputs."),
        "files": files,
    }


def executorch_info(cfg, max_seq_len: int, eos_ids: list[int], files: dict[str, str]) -> dict:
    """<target>/executorch/model_info.json: the .pte's method (see exporters/executorch.py), read by its runner."""
    return {
        "format": "executorch", "family": cfg.family, "context_length": cfg.context_length,
        "max_seq_len": max_seq_len, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "eos_token_ids": eos_ids,
        "methods": {"forward": {
            "inputs": {"tokens": {"shape": [1, "T"], "dtype": "int64"}, "input_pos": {"shape": [1], "dtype": "int64"}},
            "outputs": {"logits": {"shape": [1, cfg.vocab_size], "dtype": "float32"}}}},
        "usage": (f"T = 1..{max_seq_len} new tokens, input_pos = the cache slot of tokens[0] (tokens cached before "
                  "them). The KV cache is inside the program: a new conversation starts again at input_pos 0. "
                  "ExecuTorch's TextLLMRunner (iOS) and LlmModule (Android) drive this interface with tokenizer.json."),
        "files": files,
    }
