"""Runs inside the MLX environment (edgepack.tools.mlx_python), started by edgepack.runtime.mlx: mlx-lm's own model
code and KV cache, driven over stdin / stdout. It imports only mlx, mlx-lm and NumPy, never edgepack.

Requests are JSON lines: {"op": "load", "path", "compute"}, {"op": "prefill", "ids"}, {"op": "decode", "token"},
{"op": "generate", "ids", "max_tokens"}, {"op": "stats"}. Each answer is one JSON line; logits follow it as
`bytes` raw float32 bytes. An error is {"error": "..."} and the worker goes on.
"""

import json
import resource
import sys
import time


def main() -> None:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    out = sys.stdout.buffer
    model = cache = None

    def reply(header: dict, payload: bytes = b"") -> None:
        out.write((json.dumps({**header, "bytes": len(payload)}) + "\n").encode() + payload)
        out.flush()

    def step(ids: list[int]) -> bytes:
        logits = model(mx.array([ids]), cache=cache)[0, -1].astype(mx.float32)
        return np.array(logits).tobytes()

    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "load":
                from pathlib import Path

                from mlx_lm.utils import load_model

                start = time.perf_counter()
                model, config = load_model(Path(request["path"]))
                if request.get("compute"):  # weights as shipped; activations (and quantization scales) in this dtype
                    model.set_dtype(getattr(mx, request["compute"]))
                mx.eval(model.parameters())
                reply({"ok": True, "quantization": config.get("quantization"),
                       "load_s": time.perf_counter() - start})
            elif op == "prefill":
                cache = make_prompt_cache(model)
                reply({"ok": True}, step(request["ids"]))
            elif op == "decode":
                reply({"ok": True}, step([request["token"]]))
            elif op == "generate":  # mlx-lm's own generation loop, greedy: the check that edgepack's loop equals it
                from mlx_lm.generate import generate_step

                tokens = []
                for token, _ in generate_step(mx.array(request["ids"]), model, max_tokens=request["max_tokens"],
                                              sampler=lambda logp: mx.argmax(logp, axis=-1)):
                    tokens.append(int(token))
                    if int(token) in request.get("eos", []):
                        break
                reply({"ok": True, "tokens": tokens})
            elif op == "stats":
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                reply({"ok": True, "peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024,
                       "device": str(mx.default_device())})
            else:
                reply({"error": f"unknown request {op!r}"})
        except Exception as exc:  # noqa: BLE001 - every failure goes back to edgepack as one line
            reply({"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"})


if __name__ == "__main__":
    main()
