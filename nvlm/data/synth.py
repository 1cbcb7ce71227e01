"""A seeded synthetic multimodal data set that a tiny NVLM can learn on a CPU in minutes.

    nvlm data synth --out data/synth [--seed 0] [--train 6000] [--test 200]

Three kinds of images, each drawn with Pillow from a seeded ``random.Random``:

- **text**: a number (digits of several sizes on the half-tile grid, in a random tile, row and colour) or a
  word (any size and place) on canvases of varied aspect ratio; ``read_small`` items put a number on a canvas
  four to six tiles long, legible only through the high-resolution tiles (the thumbnail squeezes it 4-6 times);
- **chart**: a bar chart of two to four labelled bars with values to read;
- **shapes**: circles, squares and triangles with colours and counts.

Each image gets a caption (stage 1, ``pretrain.jsonl``; ``pretrain_lowres.jsonl`` leaves out the 4-6-tile
numbers, illegible at the one tile of NVLM-D's and -X's stage 1) and one question (stage 2, ``sft.jsonl``); a text-only
arithmetic set (``text.jsonl``) is blended into stage 2. Held-out splits under ``heldout/`` are drawn from
other seeds and written to other files, so they share no image with training; they are in the eval runner's
``jsonl`` format (``id``, ``image``, ``question``, ``answer``), one file per skill. ``manifest.json`` records
the arguments, and a second run with the same arguments finds it and does nothing.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from nvlm.data.records import CAPTION_PROMPT, VQA_PROMPT
from nvlm.tokenizer import _TINY_CORPUS, TINY_BASE_VOCAB, Tokenizer, train_tokenizer

COLORS = {
    "red": (210, 30, 30),
    "green": (30, 150, 40),
    "blue": (30, 60, 210),
    "black": (15, 15, 15),
    "orange": (235, 130, 20),
    "purple": (130, 40, 170),
}
WORDS = (
    "apple",
    "river",
    "tiger",
    "cloud",
    "stone",
    "green",
    "house",
    "light",
    "music",
    "paper",
    "smile",
    "train",
    "water",
    "zebra",
    "bread",
    "chair",
    "dream",
    "earth",
    "flame",
    "grape",
)
SHAPES = ("circle", "square", "triangle")
READ_NUMBER = "What number is written in the image?"
READ_WORD = "What word is written in the image?"


VERSION = 3  # of what is drawn and written: another version is drawn again (2: grey, one-tile numbers; 3: lowres)


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    train: int = 6000  # training images (each gets a caption and a question)
    test: int = 200  # held-out images per skill
    text: int = 2000  # text-only arithmetic examples
    tile_size: int = 56  # the model's tile: sizes below are in tiles, so the layout scales with it
    digits: tuple[int, int] = (2, 2)  # numbers have this many digits (inclusive range)


@dataclass
class Item:
    """One image and what it shows: a caption and one question with its short answer."""

    image: Image.Image
    caption: str
    question: str
    answer: str
    skill: str


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A mid-grey background near the ViT's mean pixel: ImageNet normalisation maps a light one to about +2
    standard deviations, a shared component that outweighed what the digits change in every crop."""
    return tuple(rng.randrange(95, 166) for _ in range(3))  # type: ignore[return-value]


def _place_text(
    rng: random.Random,
    canvas: tuple[int, int],
    text: str,
    size: int,
    color: tuple[int, int, int],
    bg: tuple[int, int, int],
) -> Image.Image:
    img = Image.new("RGB", canvas, bg)
    draw = ImageDraw.Draw(img)
    while True:  # shrink until the text fits
        font = _font(size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if (right - left <= canvas[0] - 2 and bottom - top <= canvas[1] - 2) or size <= 6:
            break
        size -= 1
    x = rng.randrange(0, max(1, int(canvas[0] - (right - left)))) - left
    y = rng.randrange(0, max(1, int(canvas[1] - (bottom - top)))) - top
    draw.text((x, y), text, fill=color, font=font)
    return img


def _draw_number(
    rng: random.Random, img: Image.Image, text: str, cell: int, col: int, row: int, color: tuple[int, int, int]
) -> None:
    """One digit per ``cell``-px square from (col, row), each centred in its square at its own size."""
    draw = ImageDraw.Draw(img)
    for k, ch in enumerate(text):
        font = _font(round(cell * rng.uniform(0.7, 0.95)))
        left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
        x = (col + k) * cell + (cell - (right - left)) // 2 - left
        y = row * cell + (cell - (bottom - top)) // 2 - top
        draw.text((x, y), ch, fill=color, font=font)


def number_item(rng: random.Random, cfg: SynthConfig, small: bool = False, one: bool = False) -> Item:
    """A number, one digit per half-tile square, at the left edge of a random tile (top or bottom half) of a
    two-tile canvas; ``small``: of a canvas four to six tiles long (wide or tall), where the thumbnail
    squeezes it 4-6 times, below legibility, but its tile does not; ``one``: of a one-tile canvas, the digits
    at the size a tile shows them, which the one-tile stage 1 (paper Table 10) sees no other way.

    Digits sit on the half-tile grid (each covers 2 x 2 of the demo model's tokens) at their own size and in
    the item's colour: a tiny ViT that starts from random weights learns to read them within the demo's
    minutes, which it does not for text at any sub-token offset. The number is in a random tile for both
    kinds, so the model learns to find the tile that holds it, the skill ``small`` numbers need.
    """
    t, cell = cfg.tile_size, cfg.tile_size // 2
    n = rng.randint(*cfg.digits)
    text = str(rng.randrange(10 ** (n - 1), 10**n))
    color_name = rng.choice(list(COLORS))
    color = COLORS[color_name]
    tiles = rng.choice((4, 5, 6)) if small else 1 if one else 2
    wide = not small or rng.random() < 0.7
    img = Image.new("RGB", (tiles * t, t) if wide else (t, tiles * t), _background(rng))
    tile = rng.randrange(tiles)
    col, row = (2 * tile, rng.randrange(2)) if wide else (0, 2 * tile + rng.randrange(2))
    _draw_number(rng, img, text, cell, col, row, color)
    return Item(
        img, f"The number {text} written in {color_name}.", READ_NUMBER, text, "read_small" if small else "read_number"
    )


def word_item(rng: random.Random, cfg: SynthConfig) -> Item:
    """A word at a random size and place on a canvas of one to three tiles (a harder reading task)."""
    t = cfg.tile_size
    canvas = rng.choice(((t, t), (2 * t, t), (3 * t, t), (2 * t, 2 * t)))
    color_name = rng.choice(list(COLORS))
    text = rng.choice(WORDS)
    img = _place_text(rng, canvas, text, round(t * rng.uniform(0.4, 0.6)), COLORS[color_name], _background(rng))
    return Item(img, f"The word {text} written in {color_name}.", READ_WORD, text, "read_word")


def chart_item(rng: random.Random, cfg: SynthConfig) -> Item:
    """A bar chart: bars A, B, ... with integer values 1-9 and a scale; ask one bar's value or the tallest."""
    t = cfg.tile_size
    n = rng.randint(2, 4)
    labels = "ABCD"[:n]
    values = [rng.randint(1, 9) for _ in range(n)]
    w, h = n * t, 2 * t
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(max(8, t // 4))
    base, top = h - t // 4, t // 3
    unit = (base - top) / 9
    color = COLORS[rng.choice(("red", "green", "blue", "orange", "purple"))]
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        x0 = i * t + t // 4
        draw.rectangle((x0, base - v * unit, x0 + t // 2, base), fill=color)
        draw.text((x0 + t // 8, base + 1), label, fill=(0, 0, 0), font=font)
        draw.text((x0 + t // 8, base - v * unit - t // 4 - 1), str(v), fill=(0, 0, 0), font=font)
    listing = ", ".join(f"{lab} {v}" for lab, v in zip(labels, values, strict=True))
    caption = f"A bar chart with {n} bars: {listing}."
    if rng.random() < 0.6:
        i = rng.randrange(n)
        return Item(img, caption, f"What is the value of bar {labels[i]}?", str(values[i]), "chart_value")
    if values.count(max(values)) > 1:  # a tie has no single tallest bar: ask a value instead
        i = rng.randrange(n)
        return Item(img, caption, f"What is the value of bar {labels[i]}?", str(values[i]), "chart_value")
    return Item(img, caption, "Which bar is the tallest?", labels[values.index(max(values))], "chart_max")


def shapes_item(rng: random.Random, cfg: SynthConfig) -> Item:
    """1-4 shapes of one kind and one colour, maybe with a distractor of another kind; count or name the colour."""
    t = cfg.tile_size
    w, h = rng.choice(((2 * t, t), (2 * t, 2 * t), (t, t)))
    shape, other = rng.sample(SHAPES, 2)
    color_name = rng.choice(list(COLORS))
    count = rng.randint(1, 4)
    img = Image.new("RGB", (w, h), _background(rng))
    draw = ImageDraw.Draw(img)
    r = t // 7
    cells = [(x, y) for x in range(w // (3 * r)) for y in range(h // (3 * r))]
    spots = rng.sample(cells, min(len(cells), count + 1))
    kinds = [shape] * count + ([other] if len(spots) > count and rng.random() < 0.5 else [])
    for kind, (cx, cy) in zip(kinds, spots, strict=False):  # a spot left over stays empty
        x, y = cx * 3 * r + r + r // 2, cy * 3 * r + r + r // 2
        fill = COLORS[color_name] if kind == shape else (120, 120, 120)
        if kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif kind == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon(((x, y - r), (x - r, y + r), (x + r, y + r)), fill=fill)
    plural = shape + "s" if count > 1 else shape
    caption = f"{count} {color_name} {plural}" + (f" and a grey {other}." if len(kinds) > count else ".")
    if rng.random() < 0.5:
        return Item(img, caption, f"How many {shape}s are there?", str(count), "count")
    return Item(
        img,
        caption,
        f"What colour is the {shape}?" if count == 1 else f"What colour are the {shape}s?",
        color_name,
        "color",
    )


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", str(a - b)


# The training mix: what fraction of images each maker draws.
MIX: tuple[tuple[float, Callable[[random.Random, SynthConfig], Item]], ...] = (
    (0.20, number_item),
    (0.15, lambda rng, cfg: number_item(rng, cfg, one=True)),
    (0.05, word_item),
    (0.30, lambda rng, cfg: number_item(rng, cfg, small=True)),
    (0.15, chart_item),
    (0.15, shapes_item),
)
# Held-out skills: one maker each.
HELDOUT: dict[str, Callable[[random.Random, SynthConfig], Item]] = {
    "read_number": number_item,
    "read_word": word_item,
    "read_small": lambda rng, cfg: number_item(rng, cfg, small=True),
    "chart": chart_item,
    "shapes": shapes_item,
}


def _pick(rng: random.Random) -> Callable[[random.Random, SynthConfig], Item]:
    x, acc = rng.random(), 0.0
    for weight, maker in MIX:
        acc += weight
        if x < acc:
            return maker
    return MIX[-1][1]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def generate(out: str | Path, cfg: SynthConfig = SynthConfig(), progress: Callable[[str], None] = print) -> Path:
    """Write the data set under ``out`` (see the module docstring); returns ``out``."""
    out = Path(out)
    manifest = out / "manifest.json"
    wanted = json.loads(json.dumps({"config": asdict(cfg), "version": VERSION}))  # tuples as JSON lists
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        progress(f"{out}: already generated with these settings")
        return out
    (out / "images" / "train").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    pretrain, lowres, sft = [], [], []
    for i in range(cfg.train):
        item = _pick(rng)(rng, cfg)
        path = f"images/train/{i:06d}.png"
        item.image.save(out / path)
        pretrain.append({"image": path, "caption": item.caption})
        if item.skill != "read_small":
            lowres.append(pretrain[-1])
        sft.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": path}, {"type": "text", "text": item.question}],
                    },
                    {"role": "assistant", "content": item.answer},
                ]
            }
        )
    _write_jsonl(out / "pretrain.jsonl", pretrain)
    _write_jsonl(out / "pretrain_lowres.jsonl", lowres)
    _write_jsonl(out / "sft.jsonl", sft)
    text = [dict(zip(("q", "a"), arithmetic(rng), strict=True)) for _ in range(cfg.text)]
    _write_jsonl(
        out / "text.jsonl",
        [{"messages": [{"role": "user", "content": t["q"]}, {"role": "assistant", "content": t["a"]}]} for t in text],
    )
    progress(f"{out}: {cfg.train} training images, {cfg.text} text-only examples")
    for k, (skill, maker) in enumerate(HELDOUT.items()):
        held = random.Random(f"heldout-{cfg.seed}-{k}")  # other seeds: no image repeats training's
        (out / "images" / skill).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(cfg.test):
            item = maker(held, cfg)
            path = f"images/{skill}/{i:05d}.png"
            item.image.save(out / path)
            records.append(
                {"id": f"{skill}-{i}", "image": f"../{path}", "question": item.question, "answer": item.answer}
            )
        (out / "heldout").mkdir(exist_ok=True)
        _write_jsonl(out / "heldout" / f"{skill}.jsonl", records)
    progress(f"{out}: held-out {', '.join(HELDOUT)} ({cfg.test} each)")
    manifest.write_text(json.dumps(wanted, indent=2) + "\n")
    return out


def train_demo_tokenizer(out: str | Path) -> Tokenizer:
    """A tokenizer trained on the data set's text (plus a little general English and the tile tags), with
    the tiny presets' ids for ``<|im_end|>`` (491) and the image placeholder ``<|vision_pad|>`` (500)."""
    return train_tokenizer(corpus(out) + _TINY_CORPUS.splitlines(), TINY_BASE_VOCAB)


def corpus(out: str | Path) -> list[str]:
    """Every text of the data set (prompts, captions, answers), for training its tokenizer."""
    out = Path(out)
    lines = [CAPTION_PROMPT, VQA_PROMPT, READ_NUMBER, READ_WORD]
    for name in ("pretrain.jsonl", "sft.jsonl", "text.jsonl"):
        for line in (out / name).read_text().splitlines():
            r = json.loads(line)
            if "caption" in r:
                lines.append(r["caption"])
            for m in r.get("messages", []):
                parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                lines += [p["text"] for p in parts if p.get("type") == "text"]
    return lines
