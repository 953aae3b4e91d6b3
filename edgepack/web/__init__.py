"""`edgepack serve`: a Flask app that serves the exported models (and the demo page) from the dist folder only."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, abort, jsonify, send_file

from edgepack.artifacts import read_manifest
from edgepack.runtime.report import load_report
from edgepack.web.vendor import VENDOR

WEB = Path(__file__).resolve().parent
STATIC = WEB / "static"
NODE_MODULES = WEB / "node_modules"  # npm ci --ignore-scripts in edgepack/web (make install, or the wheel build)
MIME = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript", ".json": "application/json",
        ".html": "text/html", ".css": "text/css", ".md": "text/markdown"}  # everything else (model files) is application/octet-stream


def safe_file(root: Path, sub: str) -> Path | None:
    """The file sub names under root, or None for anything that could reach outside it (../, absolute, \\,
    a symlink pointing out) or is not a plain file (no directory listings)."""
    if not sub or "\\" in sub or sub.startswith("/") or "\x00" in sub:
        return None
    if any(part in ("..", "") for part in sub.split("/")):
        return None
    root = root.resolve()
    path = (root / sub).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def _models(dist: Path) -> list[dict]:
    models = []
    for folder in sorted(p for p in dist.iterdir() if p.is_dir() and not p.name.startswith(".")) if dist.is_dir() else []:
        rows = load_report(folder)["rows"]
        targets = []
        for target_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            manifest = read_manifest(target_dir)
            if manifest is None:
                continue
            variants = [{
                "format": a["format"], "variant": a["variant"],
                "files": [{"path": f"{target_dir.name}/{f['path']}", "bytes": f["bytes"]} for f in a["files"]],
                "parity": rows.get(f"{manifest['target']}/{a['format']}/{a['variant']}", {}).get("parity", {}).get("metrics"),
                "bench": rows.get(f"{manifest['target']}/{a['format']}/{a['variant']}", {}).get("bench"),
            } for a in manifest["artifacts"]]
            targets.append({"target": manifest["target"], "variants": variants})
        models.append({"slug": folder.name, "targets": targets,
                       "report": "report.html" if (folder / "report.html").is_file() else None})
    return models


def _send(path: Path | None):
    """A file with its MIME type, Range support, ETag and Last-Modified; 404 for None."""
    if path is None:
        abort(404)
    mimetype = MIME.get(path.suffix, "application/octet-stream")
    return send_file(path, mimetype=mimetype, conditional=True, etag=True, last_modified=path.stat().st_mtime)


def create_app(dist: str | Path = "dist") -> Flask:
    """The app: / (index), /api/models (JSON), /models/<slug>/<path> (artifacts, with Range and ETag),
    /static/<path> (the page) and /vendor/<path> (its npm packages' browser builds)."""
    dist = Path(dist)
    app = Flask(__name__, static_folder=None)
    app.url_map.merge_slashes = False  # "//etc/passwd" is a 404, not a redirect

    @app.after_request
    def isolate(response):
        # crossOriginIsolated pages get SharedArrayBuffer, which WASM threads need.
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cross-Origin-Embedder-Policy"] = "require-corp"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/")
    def index():
        return _send(STATIC / "index.html")

    @app.get("/api/models")
    def models():
        return jsonify(_models(dist))

    @app.get("/models/<path:sub>")
    def artifact(sub: str):
        return _send(safe_file(dist, sub))

    @app.get("/static/<path:sub>")
    def static_file(sub: str):
        return _send(safe_file(STATIC, sub))

    @app.get("/vendor/<path:sub>")
    def vendor(sub: str):
        return _send(safe_file(NODE_MODULES, sub) if sub.startswith(VENDOR) else None)

    @app.errorhandler(404)
    def not_found(_):
        return jsonify({"error": "not found"}), 404

    return app
