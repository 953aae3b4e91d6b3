"""--model resolution: HF folders, .gguf files, the embedded default, and one clear error for each bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from edgepack.errors import EdgepackError
from edgepack.source import DEFAULT_SLUG, resolve


def test_a_hugging_face_folder_resolves_with_its_family_and_weights_hash(tiny_models):
    source = resolve(str(tiny_models["qwen2"]))
    assert source.family.name == "qwen2"
    assert source.slug == "tiny-qwen2"
    assert len(source.sha256) == 64
    assert resolve(str(tiny_models["qwen2"])).sha256 == source.sha256


def test_the_default_model_is_materialized_once_as_a_standard_folder(default_source):
    assert default_source.slug == DEFAULT_SLUG
    assert default_source.family.name == "llama"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (default_source.path / name).is_file(), name
    config = json.loads((default_source.path / "tokenizer_config.json").read_text())
    assert "chat_template" in config and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False  # what llama.cpp reads from the same GGUF
    assert not (default_source.path / "tokenizer.model").exists()  # no slow-tokenizer copy of the GGUF
    assert resolve(None).path == default_source.path  # reused, not rebuilt


def test_a_gguf_file_resolves_to_the_same_cached_folder_as_the_default(default_source):
    from edgepack.source import default_gguf

    assert resolve(str(default_gguf())).path == default_source.path


def test_the_default_tokenizer_splits_like_llama_cpps_own(default_source):
    """The tokenizer transformers rebuilt from the GGUF against llama.cpp's reading of the same file (vocab only)."""
    import llama_cpp
    from transformers import AutoTokenizer

    from edgepack.source import default_gguf

    llm = llama_cpp.Llama(model_path=str(default_gguf()), vocab_only=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(default_source.path)
    for text in ("2024", " Hello world", "What is the capital of France?", "x = [1, 22, 333]\n\tdef f():  return",
                 "naïve café, 東京 😀", "<|im_start|>user\nHi<|im_end|>\n"):
        ours = tok(text, add_special_tokens=False).input_ids
        assert ours == llm.tokenize(text.encode(), add_bos=False, special=True), text
        assert tok.decode(ours) == text


def _copy(folder, tmp_path):
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("no_config", "no config.json"),
    ("no_weights", "no *.safetensors weights"),
    ("garbage_weights", "corrupt safetensors"),
    ("truncated_weights", "corrupt safetensors"),
    ("unsupported", "unsupported architecture 'gpt2'"),
    ("no_tokenizer", "no tokenizer.json"),
    ("missing_gguf", "no such file"),
    ("corrupt_gguf", "not a readable GGUF"),
])
def test_bad_sources_give_one_clear_error(tiny_llama, tmp_path, case, message):
    folder = _copy(tiny_llama, tmp_path)
    weights = folder / "model.safetensors"
    if case == "missing":
        folder = tmp_path / "nope"
    elif case == "no_config":
        (folder / "config.json").unlink()
    elif case == "no_weights":
        weights.unlink()
    elif case == "garbage_weights":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    elif case == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "unsupported":
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif case == "missing_gguf":
        folder = tmp_path / "model.gguf"
    elif case == "corrupt_gguf":
        folder = tmp_path / "model.gguf"
        folder.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(EdgepackError, match=message.replace("*", r"\*").replace("(", r"\(")) as info:
        resolve(str(folder))
    assert "\n" not in str(info.value)


def test_unsupported_architecture_error_names_the_supported_families(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mistral"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgepackError, match="supports llama, qwen2, qwen3"):
        resolve(str(folder))
