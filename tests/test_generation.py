"""The generation engine: KV cache, batching with left padding, sampling, stop tokens, streaming."""

import pytest
import torch
from conftest import IMAGE_TOKEN_ID

from nvlm.generation import stream
from nvlm.models.cache import KVCache
from nvlm.pretrained import NVLM
from nvlm.sampling import SamplingParams, sample


@pytest.fixture(scope="module")
def model(nvlm_d_dir):
    return NVLM.from_pretrained(nvlm_d_dir)


def _greedy_by_recompute(model, ids, pixels, n):
    out = []
    for _ in range(n):
        nxt = model(ids, pixel_values=pixels).logits[:, -1].argmax(-1)
        out.append(int(nxt))
        ids = torch.cat([ids, nxt[:, None]], 1)
    return out


def test_kv_cache_decoding_equals_recomputing(model):
    ids = torch.tensor([[5, 6, 7] + [IMAGE_TOKEN_ID] * 8 + [9, 10]])
    pixels = torch.randn(2, 3, 56, 56)
    cached = model.generate(ids, pixel_values=pixels, max_new_tokens=10, eos_token_id=[])
    assert cached[0].tolist() == _greedy_by_recompute(model, ids, pixels, 10)


def test_cached_logits_equal_full_forward(model):
    ids = torch.randint(0, 400, (1, 12))
    full = model(ids).logits
    cache = KVCache(model.config.llm.num_layers, 12)
    first = model(ids[:, :7], attention_mask=torch.ones(1, 7), cache=cache).logits
    rest = [model(ids[:, i : i + 1], attention_mask=torch.ones(1, i + 1), cache=cache).logits for i in range(7, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, atol=1e-5, rtol=1e-5)


def test_batch_of_different_lengths_equals_one_by_one(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12] + [IMAGE_TOKEN_ID] * 4 + [13, 14]]
    pixels = torch.randn(1, 3, 56, 56)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for row, p in enumerate(prompts):
        single = model.generate(
            torch.tensor([p]), pixel_values=pixels if IMAGE_TOKEN_ID in p else None, max_new_tokens=8, eos_token_id=[]
        )
        assert batched[row].tolist() == single[0].tolist()


def test_stop_tokens_end_rows_and_pad_them(model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    stop = int(free[0, 2])  # row 0 emits it at step 3
    out = model.generate(ids, max_new_tokens=6, eos_token_id=stop, pad_token_id=-1)
    assert out[0, :3].tolist() == free[0, :3].tolist()
    assert (out[0, 3:] == -1).all()
    if stop not in free[1].tolist():
        assert out[1].tolist() == free[1, : out.shape[1]].tolist()
    both = model.generate(ids, max_new_tokens=6, eos_token_id=[stop, int(free[1, 0])])
    assert both.shape[1] <= 3  # every row stopped: no more steps


def test_streaming_yields_the_same_tokens(model):
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    steps = list(stream(model, ids, max_new_tokens=5, eos_token_id=[]))
    assert len(steps) == 5 and all(s.shape == (1,) for s in steps)
    assert torch.stack(steps, 1).tolist() == model.generate(ids, max_new_tokens=5, eos_token_id=[]).tolist()


def test_zero_top_p_and_top_k_one_act_greedy(model):
    ids = torch.tensor([[2, 7, 1, 8]])
    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    for kw in ({"top_p": 0}, {"top_k": 1}, {"top_p": 0, "top_k": 1, "temperature": 0.7}):
        out = model.generate(ids, max_new_tokens=6, eos_token_id=[], do_sample=True, seed=3, **kw)
        assert out.tolist() == greedy.tolist(), kw


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]]).repeat(2000, 1)
    p = SamplingParams(do_sample=True, top_k=2, temperature=1.5)
    a = sample(logits, p, torch.Generator().manual_seed(0))
    b = sample(logits, p, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and set(a.tolist()) == {0, 1}
    p = SamplingParams(do_sample=True, top_p=0.5)  # token 0 has p ~ 0.66: nucleus is {0}
    assert set(sample(logits, p, torch.Generator().manual_seed(0)).tolist()) == {0}
    p = SamplingParams(do_sample=True, top_p=0.9)
    assert set(sample(logits, p, torch.Generator().manual_seed(0)).tolist()) == {0, 1}


def test_bad_sampling_parameters_are_errors(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.tensor([[1]]), max_new_tokens=-1)
    with pytest.raises(TypeError):
        model.generate(torch.tensor([[1]]), max_new_tokens=2, no_such_option=1)
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=0).shape == (1, 0)


def test_the_image_placeholder_is_never_generated(model):
    """A model that prefers the placeholder above all gets its next best token: fed back, it would fail."""

    def prefer_placeholder(module, inputs, logits):
        logits[..., IMAGE_TOKEN_ID] += 1e4
        return logits

    hook = model.language_model.lm_head.register_forward_hook(prefer_placeholder)
    try:
        ids = torch.tensor([[1, 2, 3, 4]])
        assert model(ids).logits[0, -1].argmax() == IMAGE_TOKEN_ID
        for params in ({}, {"do_sample": True, "temperature": 5.0, "seed": 0}):
            out = model.generate(ids, max_new_tokens=6, **params)
            assert out.shape[1] == 6 and IMAGE_TOKEN_ID not in out.tolist()[0]
    finally:
        hook.remove()
