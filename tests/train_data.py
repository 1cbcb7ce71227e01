"""A small synthetic training set for the training tests: coloured squares and their colour names."""

import json
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250)}


def write_colors(root: Path, wide: bool = False) -> Path:
    """``root/train.jsonl`` (one record per colour; ``wide`` images tile into 2 + thumbnail) and ``text.jsonl``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for name, rgb in COLORS.items():
        Image.new("RGB", (112, 56) if wide else (56, 56), rgb).save(root / "images" / f"{name}.png")
        lines.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"images/{name}.png"},
                            {"type": "text", "text": "Color?"},
                        ],
                    },
                    {"role": "assistant", "content": name},
                ]
            }
        )
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = [
        {"messages": [{"role": "user", "content": f"{a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}]}
        for a in range(4)
    ]
    (root / "text.jsonl").write_text("".join(json.dumps(x) + "\n" for x in text))
    return root
