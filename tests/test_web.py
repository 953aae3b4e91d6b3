"""`edgepack serve`: only the dist folder is reachable; isolation headers; ranges and caching on artifacts."""

from __future__ import annotations

import os

import pytest

from edgepack.artifacts import write_json
from edgepack.web import create_app


@pytest.fixture()
def client(tmp_path):
    dist = tmp_path / "dist"
    target = dist / "tiny" / "cpu"
    target.mkdir(parents=True)
    (target / "model-F16.gguf").write_bytes(bytes(range(256)) * 4)
    write_json(target / "manifest.json", {"target": "cpu", "artifacts": [{"format": "gguf", "variant": "F16", "files": [
        {"path": "model-F16.gguf", "bytes": 1024, "sha256": "x"}]}]})
    (tmp_path / "secret.txt").write_text("do not serve")
    os.symlink(tmp_path / "secret.txt", target / "link.gguf")
    return create_app(dist).test_client()


def test_models_api_lists_exported_variants(client):
    models = client.get("/api/models").get_json()
    assert models[0]["slug"] == "tiny"
    assert models[0]["targets"][0]["variants"][0]["files"] == [{"path": "cpu/model-F16.gguf", "bytes": 1024}]


@pytest.mark.parametrize("path", [
    "/models/../secret.txt", "/models/%2e%2e/secret.txt", "/models/tiny/%2e%2e/%2e%2e/secret.txt",
    "/models/tiny/cpu/..%5c..%5csecret.txt", "/models//etc/passwd", "/models/tiny/cpu/link.gguf",
    "/models/tiny/cpu", "/models/tiny/cpu/", "/models/tiny/cpu/nope.gguf",
])
def test_nothing_outside_the_dist_folder_is_reachable(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.get_json() == {"error": "not found"}


def test_every_response_is_cross_origin_isolated(client):
    for path in ("/", "/api/models", "/models/tiny/cpu/model-F16.gguf", "/missing"):
        headers = client.get(path).headers
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"


def test_artifacts_support_ranges_and_conditional_requests(client):
    full = client.get("/models/tiny/cpu/model-F16.gguf")
    assert full.headers["Content-Type"] == "application/octet-stream"
    assert full.headers["Accept-Ranges"] == "bytes" and full.headers["ETag"] and full.headers["Last-Modified"]
    part = client.get("/models/tiny/cpu/model-F16.gguf", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.data == bytes(range(10, 20))
    cached = client.get("/models/tiny/cpu/model-F16.gguf", headers={"If-None-Match": full.headers["ETag"]})
    assert cached.status_code == 304


@pytest.mark.parametrize("path", [
    "/vendor/onnxruntime-node/package.json", "/vendor/onnxruntime-web/package.json",
    "/vendor/onnxruntime-web/dist/../package.json", "/vendor/onnxruntime-web/dist/%2e%2e/package.json",
    "/vendor/onnxruntime-web/dist/", "/static/../__init__.py", "/static/%2e%2e/__init__.py",
])
def test_only_the_pages_own_files_and_the_packages_browser_builds_are_served(client, path):
    assert client.get(path).status_code == 404


@pytest.mark.skipif(not (os.path.isdir(os.path.join(os.path.dirname(__file__), "..", "edgepack", "web", "node_modules",
                                                    "onnxruntime-web"))), reason="npm ci in edgepack/web first")
def test_the_browser_builds_are_served_with_their_types(client):
    wasm = client.get("/vendor/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm")
    assert wasm.status_code == 200 and wasm.mimetype == "application/wasm"
    module = client.get("/vendor/onnxruntime-web/dist/ort.wasm.min.mjs")
    assert module.status_code == 200 and module.mimetype == "text/javascript"
    page = client.get("/static/transformersjs-check.html")
    assert page.status_code == 200 and page.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    for path in ("/vendor/@huggingface/tokenizers/dist/tokenizers.min.mjs", "/vendor/@huggingface/jinja/dist/index.js",
                 "/vendor/@wllama/wllama/esm/index.js", "/vendor/@wllama/wllama/esm/wasm/wllama.wasm"):
        assert client.get(path).status_code == 200, path


def test_the_page_is_the_index_and_unknown_models_are_json_404s(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html" and b"/static/app.js" in page.data
    assert page.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    for path in ("/models/nope/web/onnx/model_q4.onnx", "/models/tiny/cpu/model-Q9.gguf"):
        response = client.get(path)
        assert response.status_code == 404 and response.get_json() == {"error": "not found"}


def test_the_pages_scripts_and_styles_are_served_with_their_types(client):
    for path, mimetype in (("/static/app.js", "text/javascript"), ("/static/worker.js", "text/javascript"),
                           ("/static/style.css", "text/css")):
        response = client.get(path)
        assert response.status_code == 200 and response.mimetype == mimetype, path
