import base64
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from nvlm.config import ConfigError
from nvlm.presets import preset
from nvlm.processor import Processor
from nvlm.template import PromptError

PAD4 = "<|vision_pad|>" * 4  # tiny-d: 56-px tiles, 4 tokens each
Q = "What is this?"


@pytest.fixture(scope="module")
def model_dir(tiny_d_config_dir: Path) -> Path:
    return tiny_d_config_dir


@pytest.fixture(scope="module")
def proc(model_dir: Path) -> Processor:
    return Processor.from_pretrained(model_dir)


def image(w: int, h: int, color: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_image_strings(proc: Processor) -> None:
    assert proc.config.tokens_per_tile == 4
    assert proc.image_string(1) == f"<Image><tile_global_thumbnail>{PAD4}</Image>"
    assert proc.image_string(3) == f"<Image><tile_1>{PAD4}<tile_2>{PAD4}<tile_global_thumbnail>{PAD4}</Image>"
    with pytest.raises(ValueError):
        proc.image_string(0)


@pytest.mark.parametrize(
    "size, crops, tags",
    [((56, 56), 1, ["<tile_global_thumbnail>"]), ((112, 56), 3, ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"])],
)
def test_one_image(proc: Processor, size: tuple[int, int], crops: int, tags: list[str]) -> None:
    out = proc(f"<image>\n{Q}", [image(*size)])
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}
    assert out["pixel_values"].shape == (crops, 3, 56, 56) and out["pixel_values"].dtype == torch.float32
    ids = out["input_ids"][0]
    assert int((ids == proc.image_token_id).sum()) == crops * 4
    text = proc.decode(ids, skip_special_tokens=False)
    assert text == "<Image>" + "".join(t + PAD4 for t in tags) + f"</Image>\n{Q}"
    assert ("<tile_1>" in text) == (crops > 1)


def test_tags_are_tokenized_with_the_prompt(proc: Processor) -> None:
    tok = proc.tokenizer
    ids = proc("<image>\nHi", [image(56, 56)])["input_ids"][0].tolist()
    whole = tok.encode(proc.image_string(1) + "\nHi")
    assert ids == whole
    assert ids[:3] == [tok.token_to_id(t) for t in ("<Image", "><", "tile")]  # BPE merges across the tag edge
    pieces = tok.encode("<Image>") + tok.encode("<tile_global_thumbnail>") + tok.encode(PAD4 + "</Image>\nHi")
    assert pieces != whole


def test_several_images_per_prompt_keep_their_order(proc: Processor) -> None:
    a, b = image(56, 56, (255, 0, 0)), image(56, 112, (0, 0, 255))
    out = proc(f"<image>\n<image>\n{Q}", [a, b])
    want = torch.cat([proc.image_processor(a), proc.image_processor(b)])
    assert torch.equal(out["pixel_values"], want) and want.shape[0] == 1 + 3
    assert int((out["input_ids"] == proc.image_token_id).sum()) == 4 * 4
    text = proc.decode(out["input_ids"][0], skip_special_tokens=False)
    assert text.startswith(proc.image_string(1) + "\n" + proc.image_string(3) + "\n")


def test_batch_is_left_padded(proc: Processor) -> None:
    texts = ["<image>\nA long question about this picture?", "Hi"]
    out = proc(texts, [image(56, 56)])
    ids, mask = out["input_ids"], out["attention_mask"]
    short = proc.tokenizer.encode("Hi")
    n = ids.shape[1] - len(short)
    assert n > 0 and ids[1, :n].eq(proc.tokenizer.pad_token_id).all() and ids[1, n:].tolist() == short
    assert mask[1].tolist() == [0] * n + [1] * len(short) and mask[0].eq(1).all()
    assert ids[0].tolist() == proc(texts[0], [image(56, 56)])["input_ids"][0].tolist()
    nested = proc(texts, [[image(56, 56)], []])
    assert torch.equal(nested["input_ids"], ids) and torch.equal(nested["pixel_values"], out["pixel_values"])


def test_no_images_no_pixel_values(proc: Processor) -> None:
    out = proc("Hello")
    assert set(out) == {"input_ids", "attention_mask"} and out["input_ids"].dtype == torch.long
    assert set(out.to("cpu")) == set(out)


@pytest.mark.parametrize(
    "text, images, match",
    [
        ("<image>\n<image>\nQ", [image(56, 56)], "2 <image> placeholders but 1 images"),
        ("Q", [image(56, 56)], "0 <image> placeholders but 1 images"),
        (["<image>\nQ", "Q"], [[], [image(56, 56)]], "prompt 0 has 1 <image> placeholders but 0 images"),
        (["<image>\nQ", "Q"], [[image(56, 56)]], "2 prompts but 1 per-prompt"),
    ],
)
def test_count_mismatch(proc: Processor, text: object, images: list, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        proc(text, images)


def test_apply_chat_template(proc: Processor, tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    image(112, 56).save(path)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": Q}]}]
    text = proc.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
        f"{proc.image_string(3)}\n{Q}<|im_end|><|im_start|>assistant\n"
    )
    out = proc.apply_chat_template(msgs)
    assert out["input_ids"][0].tolist() == proc.tokenizer.encode(text)
    assert out["pixel_values"].shape == (3, 3, 56, 56)
    assert proc.eos_token_ids == [proc.tokenizer.token_to_id("<|im_end|>")]


def test_apply_chat_template_batch_and_image_forms(proc: Processor) -> None:
    data = "data:image/png;base64," + base64.b64encode(png_bytes(image(56, 56))).decode()
    text = {"type": "text", "text": "A"}
    one = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}}, text]}]
    parts = [{"type": "image", "image": png_bytes(image(56, 112))}, {"type": "image", "image": image(56, 56)}, text]
    two = [{"role": "user", "content": parts}]
    texts = proc.apply_chat_template([one, two], tokenize=False)
    assert isinstance(texts, list) and [t.count("<Image>") for t in texts] == [1, 2]
    out = proc.apply_chat_template([one, two])
    assert out["input_ids"].shape[0] == 2 and out["pixel_values"].shape[0] == 1 + 3 + 1
    assert out["attention_mask"][0, 0] == 0  # the one-image conversation is shorter: padded on the left
    with pytest.raises(PromptError, match="remote image URLs"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "https://x/y.png"}]}])


def test_checkpoint_template_path(proc: Processor) -> None:
    msgs = [{"role": "user", "content": [{"type": "image", "image": image(56, 56)}, {"type": "text", "text": Q}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, chat_template="checkpoint")
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{proc.image_string(1)}\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    )
    custom = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    assert proc.apply_chat_template(msgs, tokenize=False, chat_template=custom) == f"[user]{proc.image_string(1)}\n{Q}"
    with pytest.raises(PromptError, match="unknown chat_template"):
        proc.apply_chat_template(msgs, chat_template="vicuna")


def test_decode(proc: Processor) -> None:
    ids = proc.tokenizer.encode("Hello<|im_end|>")
    assert proc.decode(ids) == "Hello" and proc.decode(torch.tensor([ids])) == "Hello"
    assert proc.batch_decode(torch.tensor([ids, ids])) == ["Hello", "Hello"]
    assert proc.decode(ids, skip_special_tokens=False) == "Hello<|im_end|>"


def test_save_and_reload(proc: Processor, model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    proc.save_pretrained(tmp_path)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == pre["image_size"] == 56 and pre["resample"] == 3
    assert pre["image_mean"] == [0.485, 0.456, 0.406] and pre["max_dynamic_patch"] == 6 and pre["use_thumbnail"]
    back = Processor.from_pretrained(tmp_path, chat_template="checkpoint")
    msgs = [{"role": "user", "content": "Hi"}]
    want = proc.apply_chat_template(msgs, tokenize=False, chat_template="checkpoint")
    assert back.apply_chat_template(msgs, tokenize=False) == want
    assert back.image_processor.num_crops(336, 56) == 7
    assert Processor.from_pretrained(tmp_path, max_tiles=2).image_processor.num_crops(336, 56) == 3
    pre["max_dynamic_patch"] = 1
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    assert Processor.from_pretrained(tmp_path).image_processor.num_crops(336, 56) == 1
    pre["crop_size"] = 448
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ConfigError, match="crop_size 448"):
        Processor.from_pretrained(tmp_path)


def test_inputs_drive_the_model(proc: Processor) -> None:
    from nvlm.pretrained import NVLM

    torch.manual_seed(0)
    model = NVLM(replace(preset("tiny-d"), image_token_id=proc.image_token_id)).eval()
    msgs = [{"role": "user", "content": [{"type": "image", "image": image(112, 56)}, {"type": "text", "text": Q}]}]
    inputs = proc.apply_chat_template([msgs, [{"role": "user", "content": "Hi"}]])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
