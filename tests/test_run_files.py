"""A run directory survives a full disk and an interrupted final save: metrics.jsonl only ever holds whole
lines (and a cut one is dropped on resume), and model/ is replaced only by a complete model."""

import errno
import json
import os
import resource
import signal

import pytest
import torch

from nvlm import NVLM, Processor
from nvlm.train.loop import Metrics, _save_final


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _with_file_size_limit(limit, fn):
    """Run ``fn`` with writes past ``limit`` bytes failing as on a full disk (EFBIG, short writes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        fn()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_metrics_append_on_a_full_disk_leaves_whole_lines_and_the_rerun_works(tmp_path):
    log = Metrics(tmp_path, 0, True)
    for step in (1, 2):
        log({"step": step, "loss": 1.0 / step}, verbose=False)
    size = (tmp_path / "metrics.jsonl").stat().st_size
    errors = []

    def append():
        try:
            log({"step": 3, "loss": 0.25, "note": "x" * 100}, verbose=False)
        except OSError as e:
            errors.append(e)

    _with_file_size_limit(size + 10, append)  # room for 10 bytes of the ~130-byte line
    assert errors and "metrics.jsonl" in str(errors[0]) and "step 3" in str(errors[0]) and "\n" not in str(errors[0])
    assert (tmp_path / "metrics.jsonl").stat().st_size == size  # the 10 written bytes were cut back off
    again = Metrics(tmp_path, 2, True)  # the rerun resumes from step 2
    again({"step": 3, "loss": 0.25}, verbose=False)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_a_cut_metrics_line_is_dropped_with_a_note_on_resume(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    log = Metrics(tmp_path, 5, True)
    assert [r.levelname for r in caplog.records if "dropped 1 unreadable line" in r.getMessage()] == ["WARNING"]
    log({"step": 3, "loss": 0.5}, verbose=False)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return NVLM.from_pretrained(tiny_model_dir), Processor.from_pretrained(tiny_model_dir)


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_failed_final_save_leaves_the_previous_model_whole(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    path = tmp_path / "model"
    _save_final(model, processor, path, rank=0)
    before = sorted(p.name for p in path.iterdir())
    changed = NVLM.from_pretrained(path)
    with torch.no_grad():
        changed.language_model.model.norm.weight.add_(1.0)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a shard cut short
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("nvlm.pretrained.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _save_final(changed, processor, path, rank=0)
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == before
    assert _same_weights(NVLM.from_pretrained(path), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .tmp left behind
    _save_final(changed, processor, path, rank=0)  # the new model replaces the old one once complete
    assert _same_weights(NVLM.from_pretrained(path), changed) and sorted(p.name for p in tmp_path.iterdir()) == [
        "model"
    ]


def test_an_interrupted_first_save_leaves_no_model_dir_and_a_stale_tmp_is_discarded(tiny, tmp_path, monkeypatch):
    model, processor = tiny

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(processor, "save_pretrained", killed)  # after the weights, before the tokenizer files
    with pytest.raises(KeyboardInterrupt):
        _save_final(model, processor, tmp_path / "model", rank=0)
    monkeypatch.undo()
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())
    (tmp_path / "model.tmp").mkdir()  # what a save killed by SIGKILL leaves
    (tmp_path / "model.tmp" / "model.safetensors").write_bytes(b"junk")
    _save_final(model, processor, tmp_path / "model", rank=0)
    assert _same_weights(NVLM.from_pretrained(tmp_path / "model"), model)
    assert (tmp_path / "model" / "tokenizer.json").is_file() and sorted(os.listdir(tmp_path)) == ["model"]
