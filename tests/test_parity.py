"""NVLM-D against an independent reference: transformers' Qwen2ForCausalLM and InternVL vision tower."""

import torch
from conftest import IMAGE_TOKEN_ID

from nvlm.pretrained import NVLM

T = 4  # image tokens per 56-px crop


def _prompt(segments: list) -> torch.Tensor:
    """Text ids (ints) and image slots (('img', n_crops)) -> (1, T) ids."""
    g = torch.Generator().manual_seed(len(segments))
    ids: list[int] = []
    for s in segments:
        if isinstance(s, tuple):
            for _ in range(s[1]):
                ids += torch.randint(0, 400, (2,), generator=g).tolist() + [IMAGE_TOKEN_ID] * T
        else:
            ids += torch.randint(0, 400, (s,), generator=g).tolist()
    return torch.tensor([ids])


def test_text_only_logits_match_qwen2(nvlm_d_dir, reference):
    model = NVLM.from_pretrained(nvlm_d_dir)
    ids = _prompt([13])
    torch.testing.assert_close(model(ids).logits, reference.logits(ids, IMAGE_TOKEN_ID), atol=1e-4, rtol=1e-4)


def test_one_image_logits_match(nvlm_d_dir, reference):
    model = NVLM.from_pretrained(nvlm_d_dir)
    ids = _prompt([5, ("img", 3), 6])
    pixels = torch.randn(3, 3, 56, 56)
    ours = model(ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, reference.logits(ids, IMAGE_TOKEN_ID, pixels), atol=1e-4, rtol=1e-4)
    # the image changes the answer: features really are scattered into the sequence
    assert not torch.allclose(ours, model(ids, pixel_values=pixels + 1).logits, atol=1e-3)


def test_several_images_logits_match(nvlm_d_dir, reference):
    model = NVLM.from_pretrained(nvlm_d_dir)
    ids = _prompt([3, ("img", 1), 4, ("img", 7), 2, ("img", 2), 5])
    pixels = torch.randn(10, 3, 56, 56)
    ours = model(ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, reference.logits(ids, IMAGE_TOKEN_ID, pixels), atol=1e-4, rtol=1e-4)


def test_left_padded_batch_matches_reference(nvlm_d_dir, reference):
    model = NVLM.from_pretrained(nvlm_d_dir)
    a, b = _prompt([9]), _prompt([4])
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ours = model(ids, attention_mask=mask).logits
    ref = reference.logits(ids, IMAGE_TOKEN_ID, attention_mask=mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)


def test_greedy_decoding_matches_hf_generate(nvlm_d_dir, reference):
    model = NVLM.from_pretrained(nvlm_d_dir)
    ids = _prompt([4, ("img", 2), 5])
    pixels = torch.randn(2, 3, 56, 56)
    ours = model.generate(ids, pixel_values=pixels, max_new_tokens=12, eos_token_id=[])
    embeds = reference.llm.get_input_embeddings()(ids).detach().clone()
    embeds[ids == IMAGE_TOKEN_ID] = reference.image_features(pixels).reshape(-1, 64)
    hf = reference.llm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert ours.tolist() == hf.tolist()


def test_llama_family_matches_transformers_llama():
    """The Yi/Llama branch (no biases) against LlamaForCausalLM, keys loaded as they are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nvlm import preset
    from nvlm.models.llm import LanguageModel

    cfg = preset("tiny-d-llama").llm
    torch.manual_seed(0)
    ref = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            rope_theta=cfg.rope_theta,
            rms_norm_eps=cfg.rms_norm_eps,
            attention_bias=False,
            tie_word_embeddings=False,
        )
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    ours = LanguageModel(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)  # no q/k/v biases to miss
    ids = torch.randint(0, 400, (2, 11))
    positions = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(ours(ours.embed(ids), positions), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_packed_row_matches_each_sample_alone(nvlm_d_dir, reference):
    """Document ids in the attention mask: each packed sample attends only itself, positions restart."""
    model = NVLM.from_pretrained(nvlm_d_dir)
    a, b = _prompt([4, ("img", 2), 3]), _prompt([7])
    pixels = torch.randn(2, 3, 56, 56)
    ids = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * a.shape[1] + [2] * b.shape[1] + [0] * 3])
    ours = model(ids, pixel_values=pixels, attention_mask=mask).logits[0]
    torch.testing.assert_close(ours[: a.shape[1]], reference.logits(a, IMAGE_TOKEN_ID, pixels)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[a.shape[1] : -3], reference.logits(b, IMAGE_TOKEN_ID)[0], atol=1e-4, rtol=1e-4)


def test_packed_rows_give_each_sample_qwen2s_gradients(nvlm_d_dir, reference):
    """Per-document attention (``Documents``) over packed and left-padded rows: logits and the LLM's
    gradients equal transformers' Qwen2 run on each sample alone."""
    model = NVLM.from_pretrained(nvlm_d_dir)
    lengths = [[6, 9, 4], [3, 12], [15]]  # row 0 ends in padding, row 1 starts with it
    samples = [[_prompt([n]) for n in row] for row in lengths]
    t = 20
    ids = torch.zeros(3, t, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.long)
    start = [0, 5, 5]
    for r, row in enumerate(samples):
        at = start[r]
        for d, s in enumerate(row):
            ids[r, at : at + s.shape[1]], mask[r, at : at + s.shape[1]] = s[0], d + 1
            at += s.shape[1]
    logits = model(ids, attention_mask=mask).logits
    ours = logits[mask > 0].square().mean() * 100
    ours.backward()
    ref_logits = torch.cat([reference.logits(s, IMAGE_TOKEN_ID)[0] for row in samples for s in row])
    torch.testing.assert_close(logits[mask > 0], ref_logits, atol=1e-4, rtol=1e-4)
    reference.llm.zero_grad()
    hf = torch.cat([reference.llm(s).logits[0] for row in samples for s in row])
    (hf.square().mean() * 100).backward()
    ref_params = dict(reference.llm.named_parameters())
    checked = 0
    for name, p in model.language_model.named_parameters():
        if p.grad is not None and name in ref_params:
            torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked >= 10


def test_a_mask_with_a_hole_matches_qwen2(nvlm_d_dir, reference):
    """A row whose document resumes after a masked token is not split into two documents: it keeps the
    (B, 1, T, T) mask, and reads as transformers reads such a mask."""
    from nvlm.models.llm import documents

    model = NVLM.from_pretrained(nvlm_d_dir)
    ids = _prompt([11])
    mask = torch.ones_like(ids)
    mask[0, 4] = 0
    assert documents(mask) is None
    ours = model(ids, attention_mask=mask).logits
    ref = reference.logits(ids, IMAGE_TOKEN_ID, attention_mask=mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)
