"""Tiny random models of every supported family, built locally from seeded configs (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Under make test's two xdist workers each worker, and every command it starts, computes on one thread: runtimes that
# spin-wait for their threads (llama.cpp, onnxruntime, OpenMP) lose far more than half their speed beside another
# busy process (edgepack.native.cpu_threads). A serial run (JOBS=1) keeps every core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("EDGEPACK_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The one table of tiny test models: kind -> config overrides. Every per-family test is parametrized over it
# (FAMILY_KINDS), so a family added here is exercised by every target. "llama3" exercises Llama 3's rope scaling,
# qwen3 an explicit head_dim; phi3 fused weights, partial rotary (a rotary width onnxruntime's attention takes:
# a multiple of 16) and LongRoPE (short factors: the context stays within original_max_position_embeddings); gemma3 Gemma 3 1B's layout (5 sliding : 1 full layers, local rotary
# base, (1 + w) sandwich norms, GeGLU, scaled embeddings) with a window of 8 tokens, which every parity prompt
# passes. query_pre_attn_scalar equals head_dim, as in Gemma 3 270M/1B (llama.cpp assumes it does).
TINY = {
    "llama": {"model_type": "llama", "tie_word_embeddings": True},
    "llama3": {"model_type": "llama", "tie_word_embeddings": False, "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, "head_dim": 32},
    "phi3": {"model_type": "phi3", "tie_word_embeddings": False, "partial_rotary_factor": 0.75,
             "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,  # head_dim 64, rotary 48
             "max_position_embeddings": 8192, "original_max_position_embeddings": 2048,
             "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.02 * i**1.5 for i in range(24)],
                              "long_factor": [1.0 + 0.3 * i**1.5 for i in range(24)]}},
    "gemma3": {"model_type": "gemma3_text", "tie_word_embeddings": True, "num_hidden_layers": 6, "head_dim": 32,
               "query_pre_attn_scalar": 32, "sliding_window": 8, "rope_theta": 1000000.0,
               "rope_local_base_freq": 10000.0, "hidden_activation": "gelu_pytorch_tanh"},
}
FAMILY_KINDS = list(TINY)
TOKENIZER_CLASS = {"phi3": "GPT2Tokenizer"}  # as Phi-4-mini's (llama.cpp's converter reads it)
# llama.cpp sets token attributes on <s>, </s>, <unk> of any model whose name contains "phi3", and fails to load
# a vocabulary without them: Phi-3's own has them.
EXTRA_SPECIAL = {"phi3": ("<s>", "</s>", "<unk>")}
# Parameters that start constant (biases at 0, Gemma's norm weights at 0 for its 1 + w) are made random, so a
# mistake in loading them shows.
RANDOMIZED = {"qwen2": ("_proj.bias",), "gemma3": ("norm.weight",)}


def build_tokenizer(folder: Path, tokenizer_class: str = "PreTrainedTokenizerFast", extra: tuple = ()) -> int:
    """A small byte-level BPE trained on edgepack's own parity texts, with ChatML specials; returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from edgepack.runtime.parity import prompt_set

    texts = prompt_set()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL + list(extra),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([texts["passage"], *texts["chat"], "user assistant system"] * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "bos_token": None, "unk_token": None, "add_bos_token": False, "chat_template": CHATML,
    }))
    return tok.get_vocab_size()


def build_tiny_model(folder: Path, kind: str, seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder, TOKENIZER_CLASS.get(kind, "PreTrainedTokenizerFast"), EXTRA_SPECIAL.get(kind, ()))
    settings = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-6, "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 2} | TINY[kind]
    config = AutoConfig.for_model(**settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, param in model.named_parameters():
        if name.endswith(RANDOMIZED.get(kind, ())):
            torch.nn.init.normal_(param, std=0.2)
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(folder)
    return folder


def with_browser_kernels(artifact, folder: Path):
    """The artifact with every MatMulNBits at accuracy_level 0 (fp32 activations), written under folder: what
    onnxruntime-web computes, on WASM and on WebGPU alike, since neither has the int8-activation kernels native
    onnxruntime runs at the level the files ask for (4). Measured on the default model's q4: native against WASM,
    max |Δ logit| 0.84; once native computes at level 0 too, 7.5e-5. So a browser's tokens are checked against
    this copy: the same graph and the same weights, through the kernel the browser has."""
    import dataclasses
    import shutil

    import onnx

    shutil.copytree(artifact.dir, folder, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"), dirs_exist_ok=True)
    files = []
    for path in artifact.files:
        if path.suffix != ".onnx":  # its external data (model*.onnx_data) is loaded with it and written with it
            continue
        model = onnx.load(str(path))
        for node in model.graph.node:
            for attr in node.attribute:
                if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                    attr.i = 0
        files.append(folder / path.relative_to(artifact.dir))
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        data = path.with_name(path.name + "_data")
        if data in artifact.files:
            onnx.save(model, str(files[-1]), save_as_external_data=True, location=data.name)
            files.append(files[-1].with_name(data.name))
        else:
            onnx.save(model, str(files[-1]))
    return dataclasses.replace(artifact, dir=folder, files=tuple(files))


# The plain variant of every target, held to the parity bars (quantized variants of random tiny models are
# judged against their plain baselines in each target's own tests, not against the default model's bars).
PLAIN_TARGETS = """
[web]
context_length = 2048
[web.onnx]
runner = "onnxruntime"
variants = ["fp32"]
thresholds = { fp32 = { max_abs_logit = 1e-3, min_greedy = 1.0 } }
[ios]
context_length = 2048
[ios.coreml]
runner = "coreml"
variants = ["fp16"]
thresholds = { fp16 = { max_kl = 2e-3, min_top1 = 0.9 } }  # fp16 compute: phi3 (wider) KL 8e-4, top-1 0.953
[android]
context_length = 2048
[android.tflite]
runner = "litert"
variants = ["fp32"]
thresholds = { fp32 = { max_abs_logit = 1e-3, min_greedy = 1.0 } }
[cpu]
context_length = 2048
[cpu.gguf]
runner = "llama.cpp"
variants = ["F16"]
thresholds = { F16 = { max_kl = 1e-4 } }
[mac]
context_length = 2048
[mac.mlx]
runner = "mlx"
variants = ["fp16"]
thresholds = { fp16 = { max_kl = 1e-3, min_top1 = 0.97 } }  # fp16 weights, float32 compute (tests/test_mlx.py)
"""


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: build_tiny_model(root / f"tiny-{kind}", kind) for kind in TINY}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def default_source():
    """The embedded default model, materialized once into the cache (about 30 s the first time)."""
    from edgepack.source import resolve

    return resolve(None)


@pytest.fixture(scope="session")
def default_dist(default_source, tmp_path_factory) -> Path:
    """The default model's web and android targets, exported once through the CLI (test_onnx, test_tflite)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("dist")
    # android without the .pte programs: lowering them takes 2.5 (fp32) and 7.5 (8da4w) min; their parity is held on
    # every tiny family (tests/test_executorch.py), pte-8da4w's bars on the default model by a slow test that adds it
    android = ["--variant", "int8", "int4", "fp32", "q4", "litertlm-int8"]
    for target, variants in (("web", []), ("android", android)):
        exported = subprocess.run([sys.executable, "-m", "edgepack", "export", "--target", target, *variants,
                                   "--out", str(out)], capture_output=True, text=True, timeout=1800)
        assert exported.returncode == 0, exported.stderr
    return out


# Under CI (CI set, as CI sets it) a skip is a failure: everything the README's setup installs must be tested, so
# a broken install (a failed llama.cpp compile, a missing chromium) turns the run red instead of green. Only skips
# for what cannot exist on this kind of machine stay skips.
CANNOT_EXIST_HERE = ("Core ML runs here", "has shader-f16")  # macOS-only Core ML; a GPU adapter with shader-f16


def _forbidden_skip(report) -> bool:
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return False
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    return not any(allowed in reason for allowed in CANNOT_EXIST_HERE)


def _fail(report) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped under CI, where every installed component must be tested: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _forbidden_skip(report):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _forbidden_skip(report):
        _fail(report)


# `make test` runs the suite on two pytest-xdist workers (--dist loadgroup). A group runs on one worker, so a
# module's own fixtures (a tiny model converted once per module) are built once, and every test of the default
# model's exported folder (default_dist: several minutes to build) shares one build, whichever module it is in.
# Marked as each test is collected, before xdist's own pytest_collection_modifyitems reads the marks.
def _group(item) -> str:
    return "default_dist" if "default_dist" in item.fixturenames else item.module.__name__


def pytest_itemcollected(item):
    item.add_marker(pytest.mark.xdist_group(_group(item)))


# The longest groups first (worker-seconds measured on a 2-core run, 2026-12-03), so that two workers end together
# instead of one waiting on a long group handed out last (the Makefile passes --no-loadscope-reorder, which keeps
# this order; xdist's own orders groups by their number of tests). Groups not named here follow in file order.
LONGEST_FIRST = ("default_dist", "test_coreml", "test_tflite", "test_scale", "test_gguf", "test_executorch", "test_cli",
                 "test_fleet", "test_gguf_oracle")  # test_scale: about 10 min since every target's 494M export


def pytest_collection_modifyitems(items):
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: file order within a rank
