"""The one generation engine: rows joining and leaving a running batch compute what they would alone (D, X,
H), per-row sampling, the repetition penalty, stop strings while streaming, cancellation, and every client
(generate, Chat, eval, server) decoding the same tokens."""

import pytest
import torch
from conftest import open_gates
from PIL import Image

from nvlm import NVLM, Chat, Processor
from nvlm.engine import Engine
from nvlm.eval.runner import Prompt, generate_batch
from nvlm.sampling import SamplingParams, penalize_repetition

WIDE = Image.new("RGB", (200, 90), (30, 90, 200))  # 2x1 tiles + thumbnail at 56 px
SMALL = Image.new("RGB", (50, 50), (200, 10, 10))


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    """arch -> (model, processor); X and H converted from the tiny D with open gates, so images matter."""
    out = {"D": (NVLM.from_pretrained(tiny_model_dir), Processor.from_pretrained(tiny_model_dir))}
    for arch in "XH":
        model = NVLM.from_pretrained(tiny_model_dir, arch=arch)
        torch.manual_seed(0)
        open_gates(model)
        path = tmp_path_factory.mktemp(f"engine-{arch}") / "model"
        model.save_pretrained(path)
        out[arch] = NVLM.from_pretrained(path), Processor.from_pretrained(path)
    return out


def _prompt(processor, text, images=()):
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    rendered = processor.render([{"role": "user", "content": content}])
    pixels = [processor.image_processor(im) for im in images]
    return processor.encode(rendered.text, [p.shape[0] for p in pixels]), pixels


def _alone(model, processor, prompt, pixels, params):
    engine = Engine(model, processor)
    (seq,) = engine.add([prompt], [pixels], [params])
    engine.run()
    return seq


@pytest.mark.parametrize("arch", "DXH")
def test_a_row_joining_and_leaving_a_running_batch_equals_its_run_alone(arch, models):
    model, processor = models[arch]
    greedy = SamplingParams(max_new_tokens=12, eos_token_id=[])
    sampled = SamplingParams(max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=1.5, top_k=50, seed=7)
    a = (*_prompt(processor, "describe the picture", [WIDE]), greedy)
    b = (*_prompt(processor, "two images, and a longer question about both", [SMALL, WIDE]), sampled)
    c = (*_prompt(processor, "text only"), greedy)
    engine = Engine(model, processor)
    (sa,) = engine.add([a[0]], [a[1]], [a[2]])
    for _ in range(3):
        engine.step()
    assert len(sa.tokens) == 4 and not sa.finished  # the first step prefills and decodes: 2 tokens, then 1 a step
    sb, sc = engine.add([b[0], c[0]], [b[1], c[1]], [b[2], c[2]])
    engine.step()
    assert len(engine.running) == 3
    engine.run()
    for seq, (prompt, pixels, params) in ((sa, a), (sb, b), (sc, c)):
        alone = _alone(model, processor, prompt, pixels, params)
        assert seq.tokens == alone.tokens and seq.text == alone.text
        assert seq.finish_reason == "length" and len(seq.tokens) == params.max_new_tokens
    assert len(sb.tokens) < len(sa.tokens)  # b left first; a and c went on without it


def test_the_repetition_penalty_against_a_hand_computed_case(models):
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -0.25])
    out = penalize_repetition(logits, torch.tensor([0, 1, 4]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0, -0.5] and logits[0] == 2.0  # not in place

    model, processor = models["D"]
    prompt, pixels = _prompt(processor, "say it again and again")
    ids = torch.tensor([prompt.input_ids])
    first = model(ids).logits[0, -1].float()
    first[model.config.image_token_id] = float("-inf")
    penalty = 1e4  # strong enough that the greedy choice must be a token the prompt does not hold
    seen = torch.tensor(sorted(set(prompt.input_ids)))
    expected = int(penalize_repetition(first, seen, penalty).argmax())
    params = SamplingParams(max_new_tokens=5, eos_token_id=[], repetition_penalty=penalty)
    seq = _alone(model, processor, prompt, pixels, params)
    assert seq.tokens[0] == expected
    assert len(set(seq.tokens)) == 5 and not set(seq.tokens) & set(prompt.input_ids)  # nothing seen twice


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(models):
    model, processor = models["D"]
    prompt, pixels = _prompt(processor, "count for me")
    free = _alone(model, processor, prompt, pixels, SamplingParams(max_new_tokens=16, eos_token_id=[]))
    stop = free.text[3:6]
    assert len(stop) == 3 and stop.strip()
    engine = Engine(model, processor)
    (seq,) = engine.add([prompt], [pixels], [SamplingParams(max_new_tokens=16, eos_token_id=[], stop=(stop, "@@"))])
    shown = []
    while engine.has_work:
        shown += [u.text for u in engine.step() if u.text]
    assert seq.finish_reason == "stop" and seq.text == free.text[: free.text.find(stop)]
    assert "".join(shown) == seq.text and len(seq.tokens) < 16


def test_cancelled_rows_leave_and_the_others_go_on(models):
    model, processor = models["H"]
    params = SamplingParams(max_new_tokens=10, eos_token_id=[])
    prompts = [_prompt(processor, "first", [WIDE]), _prompt(processor, "second question here", [SMALL])]
    engine = Engine(model, processor)
    s1, s2 = engine.add([p for p, _ in prompts], [x for _, x in prompts], [params, params])
    engine.step()
    s1.cancel()
    engine.run()
    assert s1.finish_reason == "cancelled" and len(s1.tokens) == 2
    assert s2.tokens == _alone(model, processor, *prompts[1], params).tokens


def test_every_client_decodes_the_same_tokens(models, tmp_path):
    """generate, Chat and eval's generate_batch are clients of the one engine: the same greedy answer."""
    model, processor = models["D"]
    WIDE.save(tmp_path / "wide.png")
    question = "what is in the picture?"
    chat = Chat(model, processor, max_new_tokens=8)
    said = chat.ask(question, [str(tmp_path / "wide.png")])
    inputs = processor.apply_chat_template(_prompt_messages(question, str(tmp_path / "wide.png")))
    ids = model.generate(**inputs, max_new_tokens=8, eos_token_id=processor.eos_token_ids)[0].tolist()
    ids = [i for i in ids if i not in processor.eos_token_ids]
    evaluated = generate_batch(
        model, processor, [Prompt(None, "<image>\n" + question, images=(str(tmp_path / "wide.png"),))], 8
    )
    assert said == processor.decode(ids) == evaluated[0]
    assert said  # the tiny model says something


def _prompt_messages(question, image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def test_max_new_tokens_zero_and_a_failed_prefill_finish_at_once(models):
    model, processor = models["D"]
    prompt, pixels = _prompt(processor, "hello")
    engine = Engine(model, processor)
    (seq,) = engine.add([prompt], [pixels], [SamplingParams(max_new_tokens=0)])
    engine.run()
    assert seq.finish_reason == "length" and seq.tokens == []
    bad, _ = _prompt(processor, "bad")
    bad.input_ids = bad.input_ids + [model.config.image_token_id] * 3  # image tokens, no pixels
    good = SamplingParams(max_new_tokens=3, eos_token_id=[])
    s_bad, s_good = engine.add([bad, prompt], [[], pixels], [good, good])
    engine.run()
    assert s_bad.finish_reason == "error" and s_bad.error is not None
    assert s_good.tokens == _alone(model, processor, prompt, pixels, good).tokens
