"""Asymmetric 4-bit weights on runtimes whose int4 kernels are symmetric-only (LiteRT, ExecuTorch's XNNPACK, and
Core ML's exact path).

Shared by the tflite, coreml and executorch exporters: a copy of the reference decoder whose transformer-layer
Linears hold weights exactly on a symmetric 4-bit grid per block of 32, plus small per-block offsets (see
OffsetLinear).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgepack.errors import EdgepackError


class OffsetLinear(nn.Module):
    """A Linear whose weight sits exactly on a symmetric 4-bit grid per block of 32, plus a per-block offset.

    Written by hand because LiteRT's int4 kernels take symmetric weights only, and symmetric round-to-nearest
    loses about a bit (top-1 0.70 on the default model); Core ML's affine int4 has integer zero points, which
    cannot hold a float offset either. Asymmetric 4-bit per block b (scale s, minimum lo, levels
    q in 0..15) is w = lo + s·q = s·(q − 8) + (lo + 8·s), so
        x @ w = x @ [s·(q − 8)] + BlockSums(x) @ offsets,   offsets[b] = lo_b + 8·s_b,
    the first term exactly representable as symmetric int4 (ai-edge-quantizer's dequantized-weight recovery, and
    coremltools' affine per-block quantizer, read its scales and levels back without loss), the second a small
    matmul (in_features / 32 inputs).
    """

    def __init__(self, linear: nn.Linear, block: int = 32):
        super().__init__()
        out_features, in_features = linear.weight.shape
        if in_features % block:
            raise EdgepackError(f"int4: a layer's input width {in_features} is not a multiple of {block}; "
                                "export another variant for this model")
        self.blocks, self.block = in_features // block, block
        w = linear.weight.detach().float().reshape(out_features, self.blocks, block)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((w - lo) / scale).round().clamp(0, 15)
        self.linear = nn.Linear(in_features, out_features, bias=linear.bias is not None)
        self.linear.weight = nn.Parameter((scale * (q - 8)).reshape(out_features, in_features), requires_grad=False)
        if linear.bias is not None:
            self.linear.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.offset = nn.Linear(self.blocks, out_features, bias=False)
        self.offset.weight = nn.Parameter((lo + 8 * scale).reshape(out_features, self.blocks), requires_grad=False)

    def forward(self, x):
        sums = x.reshape(*x.shape[:-1], self.blocks, self.block).sum(-1)
        return self.linear(x) + self.offset(sums)


def with_offset_linears(model, inplace: bool = False):
    """A copy of the decoder whose transformer-layer Linears are OffsetLinears (the lm_head is left alone); inplace:
    the decoder itself, each Linear freed as it is replaced (for a converter that no longer needs the original)."""
    model = model if inplace else copy.deepcopy(model)
    # An all-zero row (a padding token's embedding, never trained) gets a per-channel int8 scale of ~0, which
    # XNNPACK refuses ("unsupported scale value"): give such rows a magnitude of 1e-6 (their logit moves by ~1e-6).
    with torch.no_grad():
        tables = [m.weight for m in (model.embed, model.lm_head) if hasattr(m, "weight")]  # a slice may hold neither
        for weight in {id(w): w for w in tables}.values():
            # a block of rows at a time: weight.abs() whole is a temporary the size of the table (Phi-4-mini:
            # 2.46 GB, the peak of int4's conversion child, 18.65 GB, while the fp32 model was loaded)
            dead = torch.cat([rows.abs().amax(-1) for rows in weight.split(4096)]) < 1e-6
            weight[dead] = 1e-6
    for layer in model.layers:
        for parent in (getattr(layer, "attn", None), getattr(layer, "mlp", None)):
            if parent is None:  # a layer outside the slice a converter holds (exporters/coreml.py load_chunk)
                continue
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, OffsetLinear(child))
    return model
