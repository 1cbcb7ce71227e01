"""A shortened `nvlm demo` (a few steps): every stage leaves its files, a rerun reuses them, chat answers."""

import json
import subprocess
import sys

import pytest

from nvlm.cli import main
from nvlm.data.synth import HELDOUT
from nvlm.demo import STAGE1_STEPS, STAGE2_STEPS

SHORT = ["--scale", "0.01", "--train", "40", "--test", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), *SHORT]) == 0
    return out


def test_every_stage_produced_its_files(run):
    data = run / "data"
    for f in ("manifest.json", "pretrain.jsonl", "sft.jsonl", "text.jsonl", "tokenizer/tokenizer.json"):
        assert (data / f).is_file(), f
    assert {p.stem for p in (data / "heldout").glob("*.jsonl")} >= set(HELDOUT)
    for stage, steps in (("stage1", round(0.01 * STAGE1_STEPS)), ("stage2", round(0.01 * STAGE2_STEPS))):
        metrics = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, steps + 1))
        assert (run / stage / "model" / "model.safetensors.index.json").is_file()
    assert (run / "model" / "config.json").is_file() and (run / "model" / "tokenizer.json").is_file()
    results = json.loads((run / "eval" / "results.json").read_text())["tasks"]
    for skill in HELDOUT:
        assert results[f"jsonl:{skill}"]["n"] == 4 and "exact_match" in results[f"jsonl:{skill}"]["metrics"]
        assert f"jsonl:{skill}_blind" in results
    report = (run / "report.md").read_text()
    assert all(f"| {skill} | 4 |" in report for skill in HELDOUT)
    assert "](loss.png)" in report and "](answers.png)" in report and "stage 2 " in report and " samples/s" in report
    times = json.loads((run / "times.json").read_text())
    assert set(times) == {"data", "stage1", "stage2", "eval and chat", "total"}


def test_the_report_pictures_are_drawn(run):
    """Both stages' curves side by side; a grid of 2 held-out answers per skill (4 to a row)."""
    from PIL import Image

    loss = Image.open(run / "loss.png")
    assert loss.size == (2 * 360, 240) and len(loss.getcolors(1 << 16)) > 2
    grid = Image.open(run / "answers.png")
    rows = -(-2 * len(HELDOUT) // 4)
    assert grid.size == (4 * 280, rows * 150)
    from nvlm.demo import _predictions

    for skill in HELDOUT:  # the grid's answers are the model's, read back from nvlm eval's files
        assert len(_predictions(run / "eval", skill)) == 4


def test_a_rerun_reuses_every_stage(run, capsys):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    assert main(["demo", "--out", str(run), *SHORT]) == 0
    out = capsys.readouterr().out
    assert "already generated" in out and out.count("trained already") == 2
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}


def test_nvlm_chat_answers_from_the_trained_model(run):
    """`nvlm chat --model RUN_DIR` (the run directory: its model/ is the final model)."""
    record = json.loads((run / "data" / "heldout" / "read_number.jsonl").read_text().splitlines()[0])
    image = run / "data" / "heldout" / record["image"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nvlm.cli",
            "chat",
            "--model",
            str(run),
            "--image",
            str(image),
            "--max-new-tokens",
            "4",
            record["question"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    from nvlm import Chat
    from nvlm.pretrained import NVLM
    from nvlm.processor import Processor

    model = run / "model"
    expected = Chat(NVLM.from_pretrained(model), Processor.from_pretrained(model)).ask(
        record["question"], [str(image)], max_new_tokens=4
    )
    assert done.stdout.strip() == expected.strip()


def test_the_ablation_writes_its_table(tmp_path):
    out = tmp_path / "ablation"
    assert main(["demo", "--ablation", "--out", str(out), "--scale", "0.005", "--train", "30", "--test", "3"]) == 0
    table = (out / "ablation.md").read_text()
    for row in ("Low-res", "DHR, no tag", "DHR + 1-D tag"):
        assert f"| {row} |" in table
    scores = json.loads((out / "ablation.json").read_text())
    assert set(scores) == {"Low-res", "DHR, no tag", "DHR + 1-D tag"}
    assert all(set(r) == {"read_number", "read_small"} for r in scores.values())
    low = json.loads((out / "low-res" / "stage2" / "model" / "preprocessor_config.json").read_text())
    assert low["max_dynamic_patch"] == 1
    untagged = json.loads((out / "untagged" / "stage2" / "model" / "config.json").read_text())
    assert untagged["tile_tag"] == "" and untagged["thumbnail_tag"] == ""
