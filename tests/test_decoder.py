"""The reference decoder matches transformers' forward in fp32, on prefill and on each of 16 decode steps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgepack.model.weights import load_decoder

from conftest import FAMILY_KINDS

TOLERANCE = 1e-4


def _max_diff_over_decode(folder, prompt: list[int], steps: int = 16, capacity: int = 128) -> list[float]:
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_decoder(folder, context_length=capacity)
    diffs = []
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = ref(ids, use_cache=True)
        positions = torch.arange(len(prompt))
        logits = ours(ids, positions)
        diffs.append((logits - out.logits).abs().max().item())
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        for step in range(steps):
            out = ref(token.view(1, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
            position = torch.tensor([len(prompt) + step])
            logits = ours(token.view(1, 1), position)
            diffs.append((logits - out.logits).abs().max().item())
            token = out.logits[0, -1].argmax()
    return diffs


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_reference_decoder_matches_transformers_for_each_family(tiny_models, kind):
    # 9 prompt tokens + 16 steps: past gemma3's window of 8, so its sliding layers are exercised
    diffs = _max_diff_over_decode(tiny_models[kind], [5, 17, 42, 99, 7, 3, 250, 11, 64])
    assert len(diffs) == 17
    assert max(diffs) <= TOLERANCE, diffs


def test_reference_decoder_matches_transformers_on_the_default_model(default_source):
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 28, 2, 198, 1, 4093, 198]
    diffs = _max_diff_over_decode(default_source.path, prompt, capacity=64)
    assert max(diffs) <= TOLERANCE, diffs


def test_cache_passed_as_tensors_gives_the_same_logits_as_cache_in_buffers(tiny_models):
    model = load_decoder(tiny_models["qwen2"], context_length=32)
    k = torch.zeros(model.cache_shape())
    v = torch.zeros(model.cache_shape())
    with torch.inference_mode():
        for positions, ids in ((torch.arange(5), [[3, 4, 5, 6, 7]]), (torch.tensor([5]), [[8]])):
            stateful = model(torch.tensor(ids), positions)
            functional, k, v = model(torch.tensor(ids), positions, k, v)
            assert torch.equal(stateful, functional)
    assert torch.equal(k, model.k_cache) and torch.equal(v, model.v_cache)


def test_reset_clears_the_cache(tiny_llama):
    model = load_decoder(tiny_llama, context_length=16)
    with torch.inference_mode():
        positions = torch.arange(3)
        first = model(torch.tensor([[5, 6, 7]]), positions)
        model(torch.tensor([[9]]), torch.tensor([3]))
        model.reset()
        assert not model.k_cache.any()
        again = model(torch.tensor([[5, 6, 7]]), positions)
    assert torch.equal(first, again)
