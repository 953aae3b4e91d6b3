"""KV-cache strategies: how a decoder layer stores this step's keys and values and which keys attention reads.

Each has `attend(layer, q, k, v, window, scale) -> [1, T, heads · head_dim]`; q, k after the rotary embedding
([1, heads, T, D], [1, kv heads, T, D]), v [1, kv heads, T, D]. The cache is a fixed-capacity buffer indexed by
position (slot = position), so a sliding window is a mask over it: a query at position p sees slots
p - window < s ≤ p. (A ring buffer would let sliding layers keep only `window` slots; every target here keeps
one capacity for all layers, which costs memory on Gemma 3's local layers but keeps one cache layout.)

    TensorCache     the cache passed in and returned (index_copy): the reference decoder
    ReadOnlyCache   the cache is read, never written; this step's keys and values come out (TFLite signatures)
    StateCache      buffers written in place, read up to the tokens in use, fused attention (Core ML state)
    CustomOpCache   per-layer buffers [1, C, kv, D] written and read by ExecuTorch's llama:: custom ops (.pte)
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

FLOOR = torch.finfo(torch.float32).min


def attention(q, segments, visible, scale: float):
    """Grouped-query attention over segments [(keys, values), …] concatenated along the sequence.

    visible [T, S] (bool, or an additive float mask) says which of the S keys each query sees. Query heads are
    grouped per KV head ([1, kv, group · T, D]; head h reads KV head h // group, as repeat_kv does), so the cache
    is never repeated (a repeat copies it in TFLite); values are multiplied per segment, so the cache is never
    concatenated either.
    """
    _, heads, steps, dim = q.shape
    kv_heads = segments[0][0].shape[1]
    group = heads // kv_heads
    q = q.reshape(1, kv_heads, group * steps, dim) * scale
    scores = torch.cat([q @ keys.transpose(-1, -2) for keys, _ in segments], dim=-1)
    mask = visible if visible.dtype != torch.bool else torch.where(visible, 0.0, FLOOR)
    probs = torch.softmax(scores + mask.repeat(group, 1), dim=-1)
    out, start = 0, 0
    for keys, values in segments:
        out = out + probs[..., start:start + keys.shape[2]] @ values
        start += keys.shape[2]
    return out.reshape(1, heads, steps, dim).transpose(1, 2).reshape(1, steps, heads * dim)


def fused_attention(q, keys, values, visible, scale: float):
    """`attention` over one segment as one F.scaled_dot_product_attention call, which coremltools turns into the
    iOS 18 fused `scaled_dot_product_attention` op (Apple's recipe for LLMs on Core ML). That op has no scale
    argument (coremltools decomposes a call that passes one), so q is pre-scaled to make its 1/√D the model's
    scale, and the query heads are grouped per KV head as in `attention` ([1, kv, group · T, D]), so GQA needs no
    repeated cache. visible: an additive float mask [T, S]."""
    _, heads, steps, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    q = q.reshape(1, kv_heads, group * steps, dim)
    if abs(scale * dim**0.5 - 1.0) > 1e-6:
        q = q * (scale * dim**0.5)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible.repeat(group, 1))
    return out.reshape(1, heads, steps, dim).transpose(1, 2).reshape(1, steps, heads * dim)


def in_window(query_positions, key_positions, window: int | None):
    """[T, S] bool: key is not in the future of the query and, with a window, fewer than `window` back."""
    back = query_positions[:, None] - key_positions[None, :]
    seen = back >= 0
    return seen if window is None else seen & (back < window)


class _Masks:
    """One mask per distinct window (full attention is window None), made on first use."""

    def __init__(self, make):
        self._make, self._made = make, {}

    def __call__(self, window):
        if window not in self._made:
            self._made[window] = self._make(window)
        return self._made[window]


class TensorCache:
    """Cache tensors [layers, 1, kv, C, D] (or a list of [1, kv, C, D], one per layer) updated with index_copy at
    `positions`: in place, or as new tensors (the reference; LiteRT-LM's kv_cache_* signatures)."""

    def __init__(self, k_cache, v_cache, positions, inplace: bool):
        self.k_cache, self.v_cache, self.inplace = k_cache, v_cache, inplace
        self.positions = positions
        slots = torch.arange(k_cache[0].shape[-2], dtype=positions.dtype)
        self.mask = _Masks(lambda window: in_window(positions, slots, window))
        self.keys, self.values = [], []

    def attend(self, layer, q, k, v, window, scale):
        if self.inplace:
            self.k_cache[layer].index_copy_(2, self.positions, k)
            self.v_cache[layer].index_copy_(2, self.positions, v)
            keys, values = self.k_cache[layer], self.v_cache[layer]
        else:
            keys = self.k_cache[layer].index_copy(2, self.positions, k)
            values = self.v_cache[layer].index_copy(2, self.positions, v)
        self.keys.append(keys)
        self.values.append(values)
        return attention(q, [(keys, values)], self.mask(window), scale)


class ReadOnlyCache:
    """Attention over [cache slots < position ; this step's tokens]; the step's keys and values are collected in
    `keys` / `values` for the caller to write into the cache at `position` (TFLite's k_new / v_new)."""

    def __init__(self, k_caches, v_caches, position, steps: int):
        self.k_caches, self.v_caches = k_caches, v_caches
        capacity = k_caches[0].shape[2]
        slots = torch.arange(capacity, dtype=torch.int32)
        queries = position + torch.arange(steps, dtype=torch.int32)
        filled = (slots < position)[None, :]  # slots at or after `position` hold nothing yet (or stale padding)
        self.mask = _Masks(lambda window: torch.cat(
            (in_window(queries, slots, window) & filled, in_window(queries, queries, window)), dim=-1))
        self.keys, self.values = [], []

    def attend(self, layer, q, k, v, window, scale):
        self.keys.append(k)
        self.values.append(v)
        segments = [(self.k_caches[layer], self.v_caches[layer]), (k, v)]
        return attention(q, segments, self.mask(window), scale)


class StateCache:
    """fp16 buffers [layers, 1, kv, C, D] written in place at slots past..end-1, attention over slots 0..end-1.

    causal_mask [1, 1, T, E] is the Core ML input (additive, fp16); a sliding window is added inside the graph.
    Attention is the fused op (fused_attention).
    """

    def __init__(self, k_cache, v_cache, causal_mask, past, end, first: int = 0):
        self.k_cache, self.v_cache = k_cache, v_cache
        self.past, self.end = past, end
        self.first = first  # the model layer the buffers' row 0 holds (a chunk of layers holds its own rows)
        given = causal_mask[0, 0].float()
        queries = torch.arange(past, end, dtype=torch.int32)
        slots = torch.arange(0, end, dtype=torch.int32)
        windowed = lambda window: torch.where(in_window(queries, slots, window), given, FLOOR)  # noqa: E731
        self.mask = _Masks(lambda window: given if window is None else windowed(window))

    def attend(self, layer, q, k, v, window, scale):
        row = layer - self.first
        self.k_cache[row:row + 1, :, :, self.past:self.end] = k.half()[None]
        self.v_cache[row:row + 1, :, :, self.past:self.end] = v.half()[None]
        keys = self.k_cache[row, :, :, :self.end].float()
        values = self.v_cache[row, :, :, :self.end].float()
        return fused_attention(q, keys, values, self.mask(window), scale)


class CustomOpCache:
    """ExecuTorch's LLM layout: one buffer [1, C, kv heads, D] per layer, written at `start` by llama::update_cache
    and attended by llama::custom_sdpa (causal from start; a sliding window as an additive mask), the ops
    ExecuTorch's own Llama export uses (registered by importing executorch.extension.llm.custom_ops). Its
    custom_sdpa reads only the slots up to start + T, so a cache need not be cleared between sequences."""

    def __init__(self, k_caches, v_caches, start, steps: int):
        _register_llama_ops()
        self.k_caches, self.v_caches, self.start, self.steps = k_caches, v_caches, start, steps
        capacity = k_caches[0].shape[1]
        queries = start + torch.arange(steps)
        self.mask = _Masks(lambda window: torch.where(in_window(queries, torch.arange(capacity), window), 0.0, FLOOR))

    def attend(self, layer, q, k, v, window, scale):
        keys, values = self.k_caches[layer], self.v_caches[layer]
        torch.ops.llama.update_cache(k.transpose(1, 2), keys, self.start)
        torch.ops.llama.update_cache(v.transpose(1, 2), values, self.start)
        mask = None if window is None else self.mask(window)
        out = torch.ops.llama.custom_sdpa(q.transpose(1, 2), keys, values, self.start, mask, 0.0, window is None, scale)
        return out.reshape(1, self.steps, -1)


@functools.cache
def _register_llama_ops() -> None:
    """torch.ops.llama.* exist once executorch's custom-ops module is imported; the cache that calls them imports it,
    so eager use (a test's reference) does not depend on an export having run in the same process first."""
    import importlib

    from edgepack.native import quiet_stderr
    with quiet_stderr():  # it imports torchao, which logs the CUDA kernels it cannot load here
        importlib.import_module("executorch.extension.llm.custom_ops.custom_ops")
