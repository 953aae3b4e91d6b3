"""Activation statistics of the reference decoder over calibration text: what SmoothQuant-style scales need.

One layer at a time in float32 (a copy of that layer only), so a bf16 model of several GB is never held twice.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from edgepack.model.cache import TensorCache
from edgepack.model.decoder import Decoder


@torch.inference_mode()
def input_maxima(model: Decoder, chunks: list[list[int]]) -> dict[str, np.ndarray]:
    """max |x| per input channel of every linear layer over the token chunks, keyed by the ONNX graph's linear
    names: model.layers.{i}.self_attn.qkv_proj / .o_proj, .mlp.gate_proj (= up_proj's input) / .down_proj, lm_head."""
    maxima: dict[str, torch.Tensor] = {}

    def seen(name: str, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)

    cfg = model.cfg
    for ids in chunks:
        ids = ids[: cfg.context_length]
        positions = torch.arange(len(ids))
        k_cache = torch.zeros(model.cache_shape()[1:]).unsqueeze(0)  # one layer's slot, reused layer by layer
        v_cache = torch.zeros_like(k_cache)
        ropes = {False: model.rotary(positions)}
        if model.local_inv_freq is not None:
            ropes[True] = model.rotary(positions, local=True)
        x = model.embed(torch.tensor([ids])).float() * cfg.embed_scale
        for i, source_layer in enumerate(model.layers):
            layer = copy.deepcopy(source_layer).float()
            p = f"model.layers.{i}"
            hooks = [layer.attn.q.register_forward_pre_hook(lambda m, a, p=p: seen(f"{p}.self_attn.qkv_proj", a[0])),
                     layer.attn.o.register_forward_pre_hook(lambda m, a, p=p: seen(f"{p}.self_attn.o_proj", a[0])),
                     layer.mlp.gate.register_forward_pre_hook(lambda m, a, p=p: seen(f"{p}.mlp.gate_proj", a[0])),
                     layer.mlp.down.register_forward_pre_hook(lambda m, a, p=p: seen(f"{p}.mlp.down_proj", a[0]))]
            k_cache.zero_()
            v_cache.zero_()
            cos, sin = ropes[cfg.local_rope(i)]
            x = layer(x, cos, sin, _OneLayer(k_cache, v_cache, positions), i)
            for hook in hooks:
                hook.remove()
            del layer
        seen("lm_head", copy.deepcopy(model.norm).float()(x))
    return {name: m.numpy() for name, m in maxima.items()}


class _OneLayer(TensorCache):
    """TensorCache over one layer's tensors (slot 0), whatever layer index the block passes (it keeps the index for
    its own facts, such as the layer's window)."""

    def __init__(self, k_cache, v_cache, positions):
        super().__init__(k_cache, v_cache, positions, inplace=True)

    def attend(self, layer, q, k, v, window, scale):
        return super().attend(0, q, k, v, window, scale)
