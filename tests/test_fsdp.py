"""FSDP2 under torchrun (2 and 4 CPU processes on gloo): the same losses as one process for D, X and H in
both stages with multi-tile images, DCP checkpoints with one part per rank, kill -9 mid-step or mid-save then
resume, and resharding a 2-rank checkpoint onto 1 and onto 4 ranks (HSDP) with every tensor bit for bit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader
from train_data import write_colors

PY = sys.executable
SCRIPT = str(Path(__file__).parent / "fsdp_runs.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}


def _torchrun(n: int, *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--standalone", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run(init: Path, data: Path, out: Path, **kw) -> dict:
    base = dict(
        init=str(init),
        stage=2,
        data=[{"path": str(data / "train.jsonl"), "weight": 3}, {"path": str(data / "text.jsonl")}],
        seq_len=256,
        micro_batch_size=1,
        grad_accum=1,
        pack=False,
        steps=4,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=1,
        max_tiles=2,
        out_dir=str(out),
        save_every=1000,
        log_every=1000,
        device="cpu",
    )
    return {**base, **kw}


def _read_dcp(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, whole, read by DCP itself in one process."""
    meta = HuggingFaceStorageReader(str(path)).read_metadata()
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(out, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
    return out


def test_fsdp2_follows_the_single_process_curve_for_d_x_h_in_both_stages(tiny_model_dir, tmp_path):
    """2 ranks x 1 row = 1 process x 2 accumulated rows: the same global batches, so the same losses (1e-5)."""
    data = write_colors(tmp_path / "data", wide=True)  # 2 tiles + thumbnail at max_tiles 2
    runs = [(arch, stage) for arch in "DXH" for stage in (1, 2)]
    sharded = [_run(tiny_model_dir, data, tmp_path / f"fsdp-{a}{s}", arch=a, stage=s) for a, s in runs]
    sharded.append(_run(tiny_model_dir, data, tmp_path / "ddp-X2", arch="X", fsdp=False))
    _check(_torchrun(2, SCRIPT, "train", json.dumps(sharded)))
    single = [_run(tiny_model_dir, data, tmp_path / f"one-{a}{s}", arch=a, stage=s, grad_accum=2) for a, s in runs]
    _check(
        subprocess.run([PY, SCRIPT, "train", json.dumps(single)], env=ENV, capture_output=True, text=True, timeout=600)
    )
    for a, s in runs:
        ours, ref = _losses(tmp_path / f"fsdp-{a}{s}"), _losses(tmp_path / f"one-{a}{s}")
        assert len(ours) == 4 and len(set(ours)) == 4, (a, s, ours)
        assert ours == pytest.approx(ref, abs=1e-5), (a, s)
    assert _losses(tmp_path / "ddp-X2") == pytest.approx(_losses(tmp_path / "one-X2"), abs=1e-5)
    record = json.loads((tmp_path / "fsdp-H2" / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(record["peak_memory_gib_per_rank"]) == 2 and record["peak_memory_gib"] > 0


def _wait_for(pred, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "timed out"
        time.sleep(0.002)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_mid_step_and_mid_save_then_resume_and_reshard(tiny_model_dir, tmp_path):
    data = write_colors(tmp_path / "data", wide=True)
    cfg = _run(tiny_model_dir, data, tmp_path / "straight", arch="H", steps=12, save_every=2, keep_last=3)
    _check(_torchrun(2, SCRIPT, "train", json.dumps([cfg])))
    ckpt = tmp_path / "straight" / "checkpoints" / "step_00000012"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [
        "rank_00000.json",
        "rank_00001.json",
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors",
        "state.json",
    ]
    # no rank holds a full copy: each part has about half of the trained rows
    sizes = [(ckpt / n).stat().st_size for n in names if n.endswith(".safetensors")]
    assert max(sizes) < 0.75 * sum(sizes)

    run = tmp_path / "killed"
    killed = {**cfg, "out_dir": str(run)}
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        SCRIPT,
        "train",
        json.dumps([killed]),
    ]
    ckpts = run / "checkpoints"
    seen_tmp = False
    for when in ("mid-save", "mid-step"):
        proc = subprocess.Popen(
            cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        if when == "mid-save":  # a save under way: its directory still has the .tmp name
            _wait_for(lambda: ckpts.is_dir() and any(p.name.endswith(".tmp") for p in ckpts.iterdir()))
            seen_tmp = True
        else:  # between two saves
            n = len(_losses(run))
            _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(_losses(run)) > n)  # noqa: B023 (called now)
        _kill(proc)
        assert len(_losses(run)) < 12, "the run finished before it could be killed"
    assert seen_tmp
    _check(subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600))
    assert _losses(run) == _losses(tmp_path / "straight")

    # the 2-rank checkpoint, loaded on 1 rank and on 4 (HSDP: 2 replicas x 2 shards), saved again: every
    # trained parameter and optimiser tensor equal bit for bit
    saved = _read_dcp(ckpt)
    assert any(k.endswith(".exp_avg_sq") for k in saved) and any(k.startswith("model.xattn_layers.") for k in saved)
    for n, extra in ((1, {}), (4, {"shard_size": 2})):
        again = tmp_path / f"resaved-{n}"
        args = [SCRIPT, "resave", json.dumps({**cfg, **extra}), str(ckpt.parent), str(again)]
        _check(
            subprocess.run([PY, *args], env=ENV, capture_output=True, text=True, timeout=600)
            if n == 1
            else _torchrun(n, *args)
        )
        out = _read_dcp(again / "step_00000012")
        assert out.keys() == saved.keys()
        for k in saved:
            assert torch.equal(out[k], saved[k]), k
        assert len(list((again / "step_00000012").glob("rank_*.json"))) == n

    # and training continues from the 2-rank checkpoint on 1 process and on 4 ranks
    shutil.copytree(tmp_path / "straight", tmp_path / "on-one")
    one = {**cfg, "steps": 13, "out_dir": str(tmp_path / "on-one")}
    _check(
        subprocess.run([PY, SCRIPT, "train", json.dumps([one])], env=ENV, capture_output=True, text=True, timeout=600)
    )
    assert len(_losses(tmp_path / "on-one")) == 13
    more = {**cfg, "steps": 14}
    _check(_torchrun(4, SCRIPT, "train", json.dumps([more])))
    losses = _losses(tmp_path / "straight")
    assert len(losses) == 14 and losses[:12] == _losses(run)


def test_build_fills_the_checkpoint_and_keeps_frozen_weights_in_their_dtype(tiny_model_dir):
    """One process: the meta-built model holds the checkpoint's tensors exactly (the ViT's dummy heads
    dropped), trained parameters in fp32, frozen ones in the dtype asked for, and converted X's new blocks
    drawn the same way every time."""
    from nvlm import NVLM
    from nvlm.train.config import TrainConfig
    from nvlm.train.loop import build, make_optimizer
    from nvlm.train.stages import set_trainable
    from nvlm.train.weights import set_dtypes

    cfg = TrainConfig(init=str(tiny_model_dir), stage=1, data=[{"path": "x.jsonl"}])
    model, _, export_dtype = build(cfg, torch.device("cpu"), 1)
    ref = NVLM.from_pretrained(tiny_model_dir).state_dict()
    ours = model.state_dict()
    assert ours.keys() == ref.keys() and export_dtype == torch.float32
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    optimizer = make_optimizer(model, cfg)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.mlp1.parameters()}

    x1, _, _ = build(
        TrainConfig(init=str(tiny_model_dir), arch="X", stage=1, data=[{"path": "x.jsonl"}]), torch.device("cpu"), 1
    )
    x2, _, _ = build(
        TrainConfig(init=str(tiny_model_dir), arch="X", stage=1, data=[{"path": "x.jsonl"}]), torch.device("cpu"), 1
    )
    assert all(
        torch.equal(a, b) for a, b in zip(x1.xattn_layers.parameters(), x2.xattn_layers.parameters(), strict=True)
    )
    assert x1.xattn_layers[0].attn.q_proj.weight.std() > 0 and float(x1.xattn_layers[0].attn_gate.detach()) == 0.0

    with torch.device("meta"):
        meta = NVLM(model.config)
    set_trainable(meta, 1)
    set_dtypes(meta, torch.bfloat16)
    assert {p.dtype for p in meta.mlp1.parameters()} == {torch.float32}
    assert {p.dtype for n, p in meta.named_parameters() if not n.startswith("mlp1.")} == {torch.bfloat16}


def test_background_saves_hold_the_state_of_their_step(tiny_model_dir, tmp_path):
    """``async_save``: training goes on while a thread writes; every checkpoint still equals, bit for bit, the
    one a blocking save writes at that step, and only complete ones are ever visible. (NVLM-D, with steps where
    one rank's row has an image and the other's none: the ViT must be gathered before the embeddings on both.)"""
    data = write_colors(tmp_path / "data", wide=True)
    runs = [
        _run(tiny_model_dir, data, tmp_path / name, steps=6, save_every=2, keep_last=3, async_save=name == "async")
        for name in ("blocking", "async")
    ]
    _check(_torchrun(2, SCRIPT, "train", json.dumps(runs)))
    assert _losses(tmp_path / "async") == _losses(tmp_path / "blocking")
    for step in (2, 4, 6):
        ours = _read_dcp(tmp_path / "async" / "checkpoints" / f"step_{step:08d}")
        ref = _read_dcp(tmp_path / "blocking" / "checkpoints" / f"step_{step:08d}")
        assert ours.keys() == ref.keys() and any(k.endswith(".exp_avg") for k in ours)
        for k in ref:
            assert torch.equal(ours[k], ref[k]), (step, k)
        assert sorted(p.name for p in (tmp_path / "async" / "checkpoints" / f"step_{step:08d}").glob("*.json")) == [
            "rank_00000.json",
            "rank_00001.json",
            "state.json",
        ]
    assert not list((tmp_path / "async" / "checkpoints").glob("*.tmp"))
