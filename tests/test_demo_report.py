"""The report's pictures: loss curves drawn where the losses are, answers coloured by whether they are right."""

import json

from PIL import Image

from nvlm.demo_report import answer_grid, loss_curves, read_losses


def test_read_losses_orders_by_step(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": loss}) + "\n" for s, loss in ((2, 1.5), (1, 3.0), (3, 0.5))))
    assert read_losses(f) == [3.0, 1.5, 0.5]


def test_a_falling_curve_starts_high_and_ends_low(tmp_path):
    path = loss_curves({"a": [4.0 - 0.03 * i for i in range(100)], "b": [1.0] * 50}, tmp_path / "loss.png")
    img = Image.open(path).convert("RGB")
    assert img.size == (720, 240)

    def blue_rows(x0, x1):  # the rows where the bold running mean is drawn in these columns
        return [y for y in range(img.height) for x in range(x0, x1) if img.getpixel((x, y)) == (30, 60, 200)]

    start, end = blue_rows(50, 56), blue_rows(340, 348)
    assert start and end and min(start) < min(end)  # higher loss = nearer the top
    flat = blue_rows(360 + 100, 360 + 300)
    assert flat and max(flat) - min(flat) <= 2


def test_the_grid_colours_right_and_wrong_answers(tmp_path):
    Image.new("RGB", (112, 56), (200, 200, 255)).save(tmp_path / "a.png")
    items = [
        {"image": "a.png", "question": "Q?", "answer": "47", "truth": "47"},
        {"image": "a.png", "question": "Q?", "answer": "12", "truth": "47"},
    ]
    img = Image.open(answer_grid(items, tmp_path, tmp_path / "grid.png", cols=2)).convert("RGB")
    assert img.size == (560, 150)
    colours = [{img.getpixel((x, y)) for x in range(k * 280, (k + 1) * 280) for y in range(100, 150)} for k in (0, 1)]
    assert (20, 130, 40) in colours[0] and (200, 30, 30) not in colours[0]
    assert (200, 30, 30) in colours[1] and (20, 130, 40) not in colours[1]
