"""Processor + model + generation + chat + CLI on a tiny checkpoint that stands alone."""

import subprocess
import sys

import pytest
import torch
from conftest import IMAGE_TOKEN_ID
from PIL import Image

from nvlm import preset
from nvlm.chat import Chat
from nvlm.models.nvlm import ImageTokenMismatch
from nvlm.pretrained import NVLM
from nvlm.processor import Processor
from nvlm.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return NVLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return Processor.from_pretrained(tiny_model_dir)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def test_tiny_preset_matches_the_tiny_tokenizer():
    tok, cfg = build_tiny_tokenizer(), preset("tiny-d")
    assert tok.token_to_id(cfg.image_token) == cfg.image_token_id
    assert tok.token_to_id("<|im_end|>") == cfg.llm.eos_token_id
    assert tok.vocab_size <= cfg.llm.vocab_size


def test_chat_template_inputs_feed_model_and_generate(model, processor, reference):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": _image(120, 60)},
                {"type": "image", "image": _image(40, 40, 1)},
                {"type": "text", "text": "What differs between these?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    n_crops = inputs["pixel_values"].shape[0]
    assert n_crops == 3 + 1  # 2x1 grid + thumbnail, then a single tile
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == n_crops * 4
    logits = model(**inputs).logits
    ref = reference.logits(inputs["input_ids"], IMAGE_TOKEN_ID, inputs["pixel_values"])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    out = model.generate(**inputs, max_new_tokens=5)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 5


def test_batched_chat_prompts_equal_single_prompts(model, processor):
    convs = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": _image(200, 50)}, {"type": "text", "text": "Read it."}],
            }
        ],
        [{"role": "user", "content": "Just text, and a longer question than the first one."}],
    ]
    batch = processor.apply_chat_template(convs)
    out = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    for i, conv in enumerate(convs):
        single = model.generate(**processor.apply_chat_template(conv), max_new_tokens=6, eos_token_id=[])
        assert out[i].tolist() == single[0].tolist()


def test_image_count_mismatch_is_an_error(model, processor):
    inputs = processor("<image>\nDescribe.", images=[_image(56, 56)])
    with pytest.raises(ImageTokenMismatch, match=r"4 image tokens .* 2 crops give 8 features"):
        model(inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    with pytest.raises(ImageTokenMismatch, match="no pixel_values"):
        model(inputs["input_ids"])


def test_multi_turn_chat_streams_and_keeps_history(model, processor):
    chat = Chat(model, processor, max_new_tokens=8)
    first = list(chat.stream("Describe the image.", images=[_image(90, 60)]))
    assert "".join(first) == chat.messages[-1]["content"]
    second = chat.ask("And its colours?")
    assert len(chat.messages) == 4 and chat.messages[-1]["content"] == second
    prompt = processor.apply_chat_template(chat.messages[:3], tokenize=False)
    assert prompt.count("<Image>") == 1 and "Describe the image." in prompt and "And its colours?" in prompt


def test_saved_directory_stands_alone(model, tmp_path):
    model.save_pretrained(tmp_path / "copy")
    names = {p.name for p in (tmp_path / "copy").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    processor = Processor.from_pretrained(tmp_path / "copy")
    again = NVLM.from_pretrained(tmp_path / "copy")
    inputs = processor("<image>\nHi", images=[_image(60, 60)])
    assert torch.equal(again(**inputs).logits, model(**inputs).logits)


def _cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "nvlm.cli", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_cli_chat_answers_a_question_about_an_image(tiny_model_dir, tmp_path, processor, model):
    img = tmp_path / "cat.png"
    _image(100, 70).save(img)
    r = _cli(
        "chat", "--model", str(tiny_model_dir), "--image", str(img), "--max-new-tokens", "6", "What", "is", "this?"
    )
    assert r.returncode == 0, r.stderr
    expected = Chat(model, processor, max_new_tokens=6).ask("What is this?", images=[str(img)])
    assert r.stdout == expected + "\n"


def test_cli_chat_interactive_and_bad_image(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    r = _cli(
        "chat",
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "3",
        stdin=f"/image {bad}\nHello?\nHi again\n/exit\n",
    )
    assert r.returncode == 0, r.stderr
    assert "error:" in r.stderr and "bad.png" in r.stderr  # the bad image is named, the session goes on
    assert r.stdout.count(">>> ") >= 3
    r = _cli("chat", "--model", str(tmp_path / "nowhere"), "Hi")
    assert r.returncode == 2 and "nowhere" in r.stderr
