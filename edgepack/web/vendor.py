"""Which npm files the page may load, and which of them a wheel ships. No imports: setup.py reads this file
before edgepack is installed."""

# The only npm folders the page may load from: the packages' browser builds, nothing else of node_modules.
VENDOR = ("@huggingface/transformers/dist/", "@huggingface/transformers/node_modules/onnxruntime-web/dist/",
          "onnxruntime-web/dist/", "@wllama/wllama/esm/", "@huggingface/tokenizers/dist/", "@huggingface/jinja/dist/")


def shipped(relative: str) -> bool:
    """Whether a node_modules file goes into the wheel: browser builds (.js, .mjs, .wasm) under VENDOR, without
    Node builds, WebGL, source maps, or onnxruntime-web's unminified copies of the .min files it also ships
    (they would double the wheel's 60 MB of JavaScript for nothing the page loads)."""
    name = relative.rsplit("/", 1)[-1]
    if not relative.startswith(VENDOR) or not name.endswith((".js", ".mjs", ".wasm")):
        return False
    if ".node." in name or "webgl" in name or (name.startswith("ort.") and ".min." not in name):
        return False
    return True
