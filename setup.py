"""The wheel's one build step beyond setuptools' own: the page's JavaScript.

The page loads onnxruntime-web, transformers.js, wllama, tokenizers.js and jinja from npm, served locally. A wheel
build runs `npm ci --ignore-scripts` in edgepack/web when node_modules is missing and ships the browser builds
(edgepack/web/vendor.py says which files), the way JupyterLab extensions ship theirs through
hatch-jupyter-builder. An editable install (make install) uses the checkout's node_modules and runs nothing.
--ignore-scripts: onnxruntime-node's install script downloads binaries, and nothing here needs them.
"""

import runpy
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

WEB = Path(__file__).resolve().parent / "edgepack" / "web"
shipped = runpy.run_path(str(WEB / "vendor.py"))["shipped"]


class BuildWithJavaScript(build_py):
    def run(self):
        if not getattr(self, "editable_mode", False) and not (WEB / "node_modules" / ".package-lock.json").is_file():
            if shutil.which("npm") is None:
                raise SystemExit("edgepack's wheel needs npm to fetch the page's JavaScript (apt install npm)")
            subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=WEB, check=True)
        super().run()

    def find_data_files(self, package, src_dir):
        files = super().find_data_files(package, src_dir)
        modules = Path(src_dir) / "web" / "node_modules"
        if package == "edgepack" and not getattr(self, "editable_mode", False) and modules.is_dir():
            files += sorted(str(p) for p in modules.rglob("*")
                            if p.is_file() and shipped(p.relative_to(modules).as_posix()))
        return files


setup(cmdclass={"build_py": BuildWithJavaScript})
