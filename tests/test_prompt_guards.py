"""Prompt and image guards: user text never becomes image tokens; cheap bounds come before costly steps."""

import io
import time
from pathlib import Path

import pytest
from PIL import Image

import nvlm.processor as processor_module
from nvlm import Processor
from nvlm.image import MAX_SIDE, ImageError, ImageProcessor, load_image
from nvlm.template import PromptError

PAD = "<|vision_pad|>"


@pytest.fixture(scope="module")
def proc(tiny_d_config_dir: Path) -> Processor:
    return Processor.from_pretrained(tiny_d_config_dir)


CONVERSATIONS = [
    [{"role": "user", "content": f"say {PAD} twice"}],
    [{"role": "user", "content": [{"type": "text", "text": f"a{PAD}"}, {"type": "image", "image": "x.png"}]}],
    [{"role": "system", "content": PAD}, {"role": "user", "content": "hi"}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": f"ok {PAD}"},
        {"role": "user", "content": "?"},
    ],
]


@pytest.mark.parametrize("template", ["nvlm", "checkpoint", "{% for m in messages %}{{ m.content }}{% endfor %}"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_user_text_with_the_image_token_is_refused_by_every_renderer(proc, template, conv):
    with pytest.raises(PromptError, match=r"<\|vision_pad\|>"):
        proc.render(CONVERSATIONS[conv], chat_template=template)


def test_the_processor_paths_refuse_it_too(proc):
    with pytest.raises(PromptError, match=r"<\|vision_pad\|>"):
        proc(f"<|im_start|>user\n{PAD}<|im_end|>")
    with pytest.raises(PromptError, match=r"<\|vision_pad\|>"):
        proc.apply_chat_template([{"role": "user", "content": f"x {PAD}"}])
    assert proc("<|im_start|>user\nfine<|im_end|>")["input_ids"].shape[0] == 1


def test_encode_counts_image_tokens_even_if_a_text_check_is_missed(proc, monkeypatch):
    monkeypatch.setattr(processor_module, "check_text", lambda text, reserved, where="": text)
    with pytest.raises(PromptError, match="image token"):
        proc.encode(f"a {PAD} b", [])
    with pytest.raises(PromptError, match="image token"):
        proc.encode(f"a <image> {PAD}", [1])
    assert len(proc.encode("a <image> b", [1]).input_ids) > 4


TEXTS = [
    "hello world",
    " " * 500,
    "-" * 300 + "\n" * 40,
    "naïve café e\u0301\u0301",
    "한국어 텍스트 \u1100\u1161\u11a8",
    "数字 12345 😀😀😀",
    "<|im_start|><|im_end|>" * 5,
    "".join(chr(c) for c in range(32, 2000)),
]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_min_tokens_is_a_lower_bound(proc, text):
    assert 0 < proc.min_tokens(text) <= len(proc.tokenizer.encode(text))


def test_min_tokens_is_cheap_on_a_huge_prompt(proc):
    proc.min_tokens("warm up")
    text = "a" * (12 * 2**20)
    start = time.perf_counter()
    assert proc.min_tokens(text) > proc.config.llm.max_position_embeddings
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    proc.tokenizer.encode(text[: 2**20])  # the baseline, in the same run: tokenizing a twelfth of it
    assert seconds < time.perf_counter() - start  # not a wall-clock limit: the machine's load cancels out


def _peak_rss_mb_after(fn) -> float:
    def kb(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    base = kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    fn()
    return (kb("VmHWM") - base) / 1024


def test_a_thin_wide_image_is_refused_at_once(tmp_path):
    buf = io.BytesIO()
    Image.new("1", (25_000_000, 1)).save(buf, "PNG")  # a few KB, within a 25 MP pixel limit
    raw = buf.getvalue()
    start = time.perf_counter()

    def load():
        with pytest.raises(ImageError, match="side over"):
            load_image(raw, max_pixels=25_000_000)

    assert _peak_rss_mb_after(load) < 10 and time.perf_counter() - start < 0.5
    with pytest.raises(ImageError, match="side over"):  # a PIL image given straight to the tiler
        ImageProcessor(56)(Image.new("L", (MAX_SIDE + 1, 2)))


def test_large_and_long_images_within_the_limits_still_tile():
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, "PNG")
    assert ImageProcessor(448, 6)(load_image(buf.getvalue(), max_pixels=25_000_000)).shape == (5, 3, 448, 448)
    start = time.perf_counter()
    strip = ImageProcessor(448, 6)(Image.new("RGB", (MAX_SIDE, 1)))
    assert strip.shape == (7, 3, 448, 448) and time.perf_counter() - start < 1.0
