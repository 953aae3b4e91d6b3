"""App-ready bundles: a target's files in an app's layout, a sample that runs them, a sha256 manifest and a zip.

    bundles/android/src/main/assets/…            the .tflite (+ .ort), tokenizer, configs, model_info.json
    bundles/android/src/main/java/ai/edgepack/EdgepackLlm.kt    LiteRT Interpreter: prefill + greedy decode
    bundles/android/…/litertlm/                  the .litertlm bundles (when exported), for LiteRT-LM's Kotlin API
    bundles/ios/Resources/…                      the .mlpackage(s), tokenizer, configs, model_info.json
    bundles/ios/Sources/EdgepackLlm.swift        Core ML: state, prefill + greedy decode
    bundles/<platform>/…/executorch/             the .pte files, tokenizer.json, model_info.json (when exported):
                                                 for ExecuTorch's own LLM runners, named in the README
    bundles/<platform>/README.md                 what goes where (Gradle noCompress, Xcode target membership)
    bundles/<platform>/bundle-manifest.json      sha256 and size of every other file

Unzip into the app module (android: app/, ios: the app target's folder). The baseline/ builds validate compares
with are left out.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from edgepack import __version__
from edgepack.artifacts import BASELINE_DIR, MANIFEST, model_dir, read_manifest, sha256_file, write_json
from edgepack.errors import EdgepackError
from edgepack.source import Source

BUNDLE_MANIFEST = "bundle-manifest.json"
LAYOUTS = {
    "android": {"assets": "src/main/assets", "sample": ("EdgepackLlm.kt", "src/main/java/ai/edgepack/EdgepackLlm.kt")},
    "ios": {"assets": "Resources", "sample": ("EdgepackLlm.swift", "Sources/EdgepackLlm.swift")},
}
README = {
    "android": """# {slug} for Android (edgepack {version})

Unzip into your app module (`app/`): the model and its files land in `src/main/assets/`, the sample in
`src/main/java/ai/edgepack/EdgepackLlm.kt`.

Model files must stay uncompressed in the APK so they can be memory-mapped. In `app/build.gradle.kts`:

    android {{
        androidResources {{ noCompress += listOf("tflite", "ort", "litertlm") }}
    }}
    dependencies {{
        implementation("com.google.ai.edge.litert:litert:1.4.0")           // .tflite
        implementation("com.microsoft.onnxruntime:onnxruntime-android:1.22.0")  // .ort, if you use it
    }}

`model_info.json` names the signatures (prefill, decode), their inputs and outputs, the cache shape, the
prefill length and the end-of-turn ids; the sample reads everything from it. `bundle-manifest.json` lists the
sha256 of every file (`edgepack bundle --verify DIR` re-checks them).

LiteRT-LM (Google's LLM engine on Android) instead of the raw Interpreter: `litertlm/<model>-int8.litertlm` (or
`-int4`) holds the model, the tokenizer, the chat template and the stop tokens. Add
`implementation("com.google.ai.edge.litertlm:litertlm-android:latest.release")` (edgepack proves the files with
LiteRT-LM 0.18.1's engine; pin the release you test), copy the file from the assets to `filesDir` once (the engine takes a
path), then:

    val engine = Engine(EngineConfig(modelPath = file.absolutePath, backend = Backend.CPU))
    engine.initialize()  // seconds: off the main thread
    engine.createConversation().use {{ conversation ->
        conversation.sendMessageAsync("What is the capital of France?").collect {{ print(it) }}
    }}

`litertlm/model_info.json` describes the signatures inside (prefill_128 and decode over kv_cache_* tensors).

ExecuTorch instead of LiteRT: `executorch/model_8da4w.pte` (or `model_fp32.pte`) with `executorch/tokenizer.json`
runs in ExecuTorch's own LLM runner, `org.pytorch.executorch.extension.llm.LlmModule` from
`implementation("org.pytorch:executorch-android:1.0.1")` (add "pte" to noCompress). It takes file paths, so copy
both files from the assets to `filesDir` once, then `LlmModule(ptePath, tokenizerPath, 0.0f)`, `load()`, and
`generate(prompt, seqLen, callback)` with the prompt already in the model's chat format (`chat_template.jinja`).
`executorch/model_info.json` describes the program's one method (forward(tokens, input_pos), the KV cache inside).

Files:
{files}
""",
    "ios": """# {slug} for iOS / macOS (edgepack {version})

Add `Resources/` to your app target (the .mlpackage compiles to .mlmodelc at build time) and
`Sources/EdgepackLlm.swift`. Needs iOS 18 / macOS 15 (Core ML state for the KV cache).

`model_info.json` names the inputs, outputs and states and their shapes, the context length and the
end-of-turn ids; the sample reads everything from it. A large model is a chain of packages
(`model_int4_1of3.mlpackage` …, listed in order under `files`, each one's interface under `chunks`): the sample
loads them all and passes each one's `hidden_out` to the next as `hidden_in`, each with its own state. `bundle-manifest.json` lists the sha256 of every file
(`edgepack bundle --verify DIR` re-checks them).

ExecuTorch instead of Core ML: `executorch/model_8da4w.pte` (or `model_fp32.pte`) with `executorch/tokenizer.json`
runs in ExecuTorch's own LLM runner: add the `executorch` Swift package (products `executorch_llm`,
`backend_xnnpack`, `kernels_llm`, `kernels_optimized`, with the linker flags its iOS guide gives so the kernels
register), `import ExecuTorchLLM`, create
`TextLLMRunner(modelPath:tokenizerPath:)` with the two files' bundle paths and call its `generate` with the prompt
already in the model's chat format (`chat_template.jinja`) and a token callback. `executorch/model_info.json`
describes the program's one method (forward(tokens, input_pos), the KV cache inside).

Files:
{files}
""",
}


def build_bundle(platform: str, source: Source, dist: Path) -> Path:
    """dist/<slug>/bundles/<platform>/ and <platform>.zip from the exported target folder (written atomically)."""
    if platform not in LAYOUTS:
        raise EdgepackError(f"bundle: unknown platform '{platform}'; valid: {', '.join(LAYOUTS)}")
    folder = model_dir(dist, source.slug)
    target_dir = folder / platform  # the platform is the target's name
    manifest = read_manifest(target_dir)
    if manifest is None:
        raise EdgepackError(f"no {platform} artifacts under {target_dir}; run edgepack export --target "
                            f"{platform} first (see edgepack doctor for what is available)")
    layout = LAYOUTS[platform]
    out = folder / "bundles" / platform
    tmp = out.with_name(f".{platform}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(target_dir, tmp / layout["assets"], ignore=shutil.ignore_patterns(MANIFEST, BASELINE_DIR))
    template, dest = layout["sample"]
    (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
    (tmp / dest).write_text(resources.files("edgepack.mobile").joinpath("templates", template).read_text())
    assets = sorted(p.relative_to(tmp).as_posix() for p in (tmp / layout["assets"]).rglob("*") if p.is_file())
    (tmp / "README.md").write_text(README[platform].format(
        slug=source.slug, version=__version__, files="\n".join(f"- `{name}`" for name in assets)))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    write_json(tmp / BUNDLE_MANIFEST, {
        "platform": platform, "model": source.slug, "edgepack": __version__,
        "variants": [f"{a['format']}/{a['variant']}" for a in manifest["artifacts"]],
        "files": {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    })
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    archive = shutil.make_archive(str(out), "zip", out)
    return Path(archive)


def verify_bundle(folder: Path) -> list[str]:
    """Re-hash every file a bundle's manifest lists; one line per problem (empty when all match)."""
    path = folder / BUNDLE_MANIFEST
    if not path.is_file():
        raise EdgepackError(f"{folder}: no {BUNDLE_MANIFEST}; this is not an edgepack bundle")
    listed = json.loads(path.read_text())["files"]
    problems = []
    for name, facts in listed.items():
        file = folder / name
        if not file.is_file():
            problems.append(f"missing: {name}")
        elif sha256_file(file) != facts["sha256"]:
            problems.append(f"sha256 mismatch: {name}")
    extra = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - set(listed) - {BUNDLE_MANIFEST}
    problems += [f"not in manifest: {name}" for name in sorted(extra)]
    return problems
