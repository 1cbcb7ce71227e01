"""The pictures of the demo's ``report.md``, drawn with Pillow: the loss curves and a grid of held-out answers.

``loss_curves`` plots the per-step training loss of each stage (``metrics.jsonl``), one panel per stage on
a shared loss axis, the raw loss faint and its running mean bold. ``answer_grid`` lays out held-out images,
each fitted into a fixed cell (enlarged at most 2x), under it the question, the model's answer and the truth
(green when they agree, red when not). Both write a PNG and return its path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_FONT = ImageFont.load_default(size=13)
_INK, _GRID, _RAW, _MEAN = (20, 20, 20), (225, 225, 225), (170, 190, 230), (30, 60, 200)
_RIGHT, _WRONG = (20, 130, 40), (200, 30, 30)


def read_losses(metrics: Path) -> list[float]:
    """The ``loss`` of every line of a ``metrics.jsonl``, in step order."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [float(r["loss"]) for r in sorted(records, key=lambda r: r["step"])]


def samples_per_s(metrics: Path) -> float:
    """A run's training throughput in examples a second (paper Table 3's measure): all its samples over all
    its step time, from a ``metrics.jsonl``."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    seconds = sum(r["samples"] / r["samples_per_s"] for r in records if r["samples_per_s"] > 0)
    return sum(r["samples"] for r in records) / seconds if seconds else 0.0


def _running_mean(xs: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x - (xs[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def loss_curves(stages: Mapping[str, Sequence[float]], path: Path, size: tuple[int, int] = (360, 240)) -> Path:
    """One panel per stage (title -> losses by step), side by side, sharing the loss axis from 0."""
    top = max((max(v) for v in stages.values() if v), default=1.0) * 1.05
    w, h = size
    pad_l, pad_b, pad_t = 44, 28, 24
    img = Image.new("RGB", (w * len(stages), h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, (title, losses) in enumerate(stages.items()):
        x0, x1, y0, y1 = k * w + pad_l, (k + 1) * w - 10, pad_t, h - pad_b
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = y1 - frac * (y1 - y0)
            draw.line((x0, y, x1, y), fill=_GRID)
            draw.text((x0 - 6, y), f"{frac * top:.1f}", fill=_INK, font=_FONT, anchor="rm")
        draw.line((x0, y0, x0, y1, x1, y1), fill=_INK)
        n = max(len(losses), 2)
        draw.text(((x0 + x1) / 2, 4), title, fill=_INK, font=_FONT, anchor="ma")
        draw.text((x0, y1 + 6), "1", fill=_INK, font=_FONT, anchor="la")
        draw.text((x1, y1 + 6), f"step {len(losses)}", fill=_INK, font=_FONT, anchor="ra")

        def xy(i: int, v: float) -> tuple[float, float]:
            return x0 + i / (n - 1) * (x1 - x0), y1 - min(v, top) / top * (y1 - y0)  # noqa: B023 (this panel's)

        for series, color, width in ((losses, _RAW, 1), (_running_mean(losses, 25), _MEAN, 2)):
            if len(series) > 1:
                draw.line([xy(i, v) for i, v in enumerate(series)], fill=color, width=width)
    img.save(path)
    return path


def answer_grid(
    items: Sequence[dict], root: Path, path: Path, cols: int = 4, cell: tuple[int, int] = (280, 150)
) -> Path:
    """``items``: dicts with ``image`` (a path under ``root``), ``question``, ``answer`` (the model's) and
    ``truth``; ``cols`` to a row, each image fitted into the top of its cell (enlarged at most 2x), three
    lines of text under it."""
    w, h = cell
    text_h = 3 * 16 + 4
    rows = max(1, -(-len(items) // cols))
    img = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, it in enumerate(items):
        x, y = (k % cols) * w, (k // cols) * h
        pic = Image.open(root / it["image"]).convert("RGB")
        scale = min((w - 8) / pic.width, (h - text_h - 8) / pic.height, 2.0)  # small images shown up to 2x
        pic = pic.resize(
            (max(1, round(pic.width * scale)), max(1, round(pic.height * scale))), Image.Resampling.LANCZOS
        )
        img.paste(pic, (x + (w - pic.width) // 2, y + 4))
        draw.rectangle(
            (x + (w - pic.width) // 2 - 1, y + 3, x + (w + pic.width) // 2, y + 4 + pic.height), outline=_GRID
        )
        ty = y + h - text_h
        right = str(it["answer"]).strip() == str(it["truth"]).strip()
        draw.text((x + 4, ty), str(it["question"]), fill=_INK, font=_FONT)
        draw.text((x + 4, ty + 16), f"model: {it['answer']}", fill=_RIGHT if right else _WRONG, font=_FONT)
        draw.text((x + 4, ty + 32), f"truth: {it['truth']}", fill=_INK, font=_FONT)
    img.save(path)
    return path
