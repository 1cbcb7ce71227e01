"""The synthetic data set of the CPU demo: reproducible, held out for real, readable by training and eval."""

import hashlib
import json

import pytest

from nvlm.data.records import JsonlFile
from nvlm.data.synth import HELDOUT, SynthConfig, generate, train_demo_tokenizer

CFG = SynthConfig(seed=3, train=60, test=6, text=20)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "a", CFG, progress=lambda s: None)


def _digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_data(synth, tmp_path):
    again = generate(tmp_path / "b", CFG, progress=lambda s: None)
    assert _digest(synth) == _digest(again)
    other = generate(tmp_path / "c", SynthConfig(seed=4, train=60, test=6, text=20), progress=lambda s: None)
    assert (other / "sft.jsonl").read_text() != (synth / "sft.jsonl").read_text()


def test_a_second_run_reuses_what_is_there(synth):
    before = {p: p.stat().st_mtime_ns for p in synth.rglob("*.jsonl")}
    said = []
    generate(synth, CFG, progress=said.append)
    assert "already generated" in said[0]
    assert before == {p: p.stat().st_mtime_ns for p in synth.rglob("*.jsonl")}


def test_held_out_images_are_not_training_images(synth):
    train = {hashlib.sha256(p.read_bytes()).digest() for p in (synth / "images" / "train").iterdir()}
    for skill in HELDOUT:
        records = [json.loads(line) for line in (synth / "heldout" / f"{skill}.jsonl").read_text().splitlines()]
        assert len(records) == CFG.test
        for r in records:
            image = (synth / "heldout" / r["image"]).resolve()
            assert image.is_file() and "train" not in image.parts
            assert hashlib.sha256(image.read_bytes()).digest() not in train
            assert set(r) == {"id", "image", "question", "answer"} and r["answer"]


def test_records_read_as_training_conversations(synth):
    from PIL import Image

    lowres = [json.loads(x) for x in (synth / "pretrain_lowres.jsonl").read_text().splitlines()]
    everything = [json.loads(x) for x in (synth / "pretrain.jsonl").read_text().splitlines()]
    assert 0 < len(lowres) < len(everything) and all(r in everything for r in lowres)
    for r in everything:  # the low-resolution captions are those of every image at most 3 tiles long
        w, h = Image.open(synth / r["image"]).size
        assert (r in lowres) == (max(w, h) <= 3 * min(w, h))
    for name in ("pretrain.jsonl", "pretrain_lowres.jsonl", "sft.jsonl", "text.jsonl"):
        f = JsonlFile.read(synth / name)
        for i in range(len(f)):
            msgs = f.messages(i)
            assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[1]["content"]
            images = (
                [p["image"] for p in msgs[0]["content"] if isinstance(p, dict) and p.get("type") == "image"]
                if isinstance(msgs[0]["content"], list)
                else []
            )
            assert len(images) == (0 if name == "text.jsonl" else 1)
            for path in images:
                Image.open(path).verify()


def test_the_mix_has_every_kind_and_small_text_needs_the_tiles(synth):
    from PIL import Image

    sft = [json.loads(line) for line in (synth / "sft.jsonl").read_text().splitlines()]
    questions = {m["messages"][0]["content"][1]["text"] for m in sft}
    assert any("number" in q for q in questions) and any("bar" in q for q in questions)
    assert any("How many" in q or "colour" in q for q in questions) and any("word" in q for q in questions)
    small = [json.loads(line) for line in (synth / "heldout" / "read_small.jsonl").read_text().splitlines()]
    for r in small:  # 4-6 tiles long: the 56-px thumbnail squeezes a 28-px digit to 5-7 px
        w, h = Image.open(synth / "heldout" / r["image"]).size
        assert max(w, h) >= 4 * CFG.tile_size and min(w, h) == CFG.tile_size
    sums = [json.loads(line)["messages"] for line in (synth / "text.jsonl").read_text().splitlines()]
    for user, answer in ((m[0]["content"], m[1]["content"]) for m in sums):
        a, op, b = user.removeprefix("What is ").rstrip("?").split(" ")
        assert int(answer) == (int(a) + int(b) if op == "plus" else int(a) - int(b))


def test_the_trained_tokenizer_has_the_presets_special_ids_and_reads_digits_one_by_one(synth):
    tok = train_demo_tokenizer(synth)
    assert tok.token_to_id("<|im_end|>") == 491 and tok.token_to_id("<|vision_pad|>") == 500
    assert tok.vocab_size <= 512
    ids = tok.encode("The number 47 written in red.")
    assert tok.decode(ids) == "The number 47 written in red."
    assert [tok.decode([i]) for i in tok.encode("4072")] == ["4", "0", "7", "2"]
    assert len(tok.encode("The number")) <= 3  # learned from the data: whole words


def test_a_number_lies_in_one_random_tile():
    """Every digit's ink inside a single tile, and that tile varies: the model must find it (a one-tile
    number: a one-tile canvas)."""
    import random

    from nvlm.data.synth import number_item

    t, cfg = CFG.tile_size, CFG
    rng = random.Random(0)
    for small, one in ((False, False), (True, False), (False, True)):
        where = set()
        for _ in range(40):
            item = number_item(rng, cfg, small=small, one=one)
            img = item.image
            w, h = img.size
            bg = max(img.getcolors(1 << 16))[1]  # the most common colour: the background
            ink = {
                (x // t, y // t)
                for x in range(w)
                for y in range(h)
                if max(abs(a - b) for a, b in zip(img.getpixel((x, y)), bg, strict=True)) > 40
            }
            assert len(ink) == 1, (small, ink)
            where |= ink
            assert (max(w, h) // t in (4, 5, 6)) if small else (w, h) == ((t, t) if one else (2 * t, t))
        assert len(where) > 1 or one
