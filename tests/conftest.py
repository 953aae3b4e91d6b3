"""Tiny random models of every supported family, built locally from seeded configs (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# family -> config overrides; "llama3" exercises Llama 3's rope scaling, qwen3 an explicit head_dim.
TINY = {
    "llama": {"model_type": "llama", "tie_word_embeddings": True},
    "llama3": {"model_type": "llama", "tie_word_embeddings": False, "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, "head_dim": 32},
}


def build_tokenizer(folder: Path) -> int:
    """A small byte-level BPE trained on edgepack's own parity texts, with ChatML specials; returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from edgepack.runtime.parity import prompt_set

    texts = prompt_set()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([texts["passage"], *texts["chat"], "user assistant system"] * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "bos_token": None, "unk_token": None, "add_bos_token": False, "chat_template": CHATML,
    }))
    return tok.get_vocab_size()


def build_tiny_model(folder: Path, kind: str, seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    overrides = dict(TINY[kind])
    model_type = overrides.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2, **overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type == "qwen2":  # random biases, so a mistake in loading them shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.2)
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(folder)
    return folder


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
    for target in ("web", "android"):
        exported = subprocess.run([sys.executable, "-m", "edgepack", "export", "--target", target, "--out", str(out)],
                                  capture_output=True, text=True, timeout=1200)
        assert exported.returncode == 0, exported.stderr
    return out
