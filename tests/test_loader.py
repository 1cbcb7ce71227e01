"""The training data loader: the same batches for every number of workers, exact resume, the resharding rule,
disjoint ranks, clear errors from workers, and no process left behind (also under torchrun)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loader_data import FailingImages, loader, processor, write_data

from nvlm.data.blend import Blend
from nvlm.data.loader import reshard

PY = sys.executable
HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks read /proc")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("loader-data"))


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def _gone(pids: list[int], within: float = 10.0) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and " Z " not in Path(f"/proc/{p}/stat").read_text()]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _stream_index(sources, n: int) -> dict[tuple[int, int], int]:
    """(source, record) -> global stream item k, for the first n items (no record twice: within an epoch)."""
    blend = Blend(processor(), sources, 96, seed=1)
    index = {blend.next_record(): k for k in range(n)}
    assert len(index) == n
    return index


def _items(data_loader, index, batches: int) -> list[int]:
    """The stream items of the examples in the next batches (text records are told apart by their tokens)."""
    by_tokens = {}
    blend = Blend(processor(), data_loader.blend.sources, 96)
    for (src, i), k in index.items():
        ex = blend.encode(src, i)
        if hasattr(ex, "input_ids"):
            by_tokens.setdefault(tuple(ex.input_ids.tolist()), []).append(k)
    out = []
    for _ in range(batches):
        b = data_loader()
        for r in range(b["input_ids"].shape[0]):
            for doc in range(1, int(b["attention_mask"][r].max()) + 1):
                ks = by_tokens[tuple(b["input_ids"][r][b["attention_mask"][r] == doc].tolist())]
                out.append(ks[0] if len(ks) == 1 else tuple(ks))  # an image record may stand for several items
    return out


def test_the_batches_are_the_same_for_0_1_and_2_workers(sources):
    runs = []
    for workers in (0, 1, 2):
        with loader(sources, rank=1, world_size=2, num_workers=workers) as data_loader:
            runs.append(([data_loader() for _ in range(8)], data_loader.state_dict()))
    assert "pixel_values" in runs[0][0][0] and sum(runs[0][1]["skipped"].values()) > 0
    assert int(runs[0][0][0]["attention_mask"].max()) > 1  # packed
    for batches, state in runs[1:]:
        _assert_same(batches, runs[0][0])
        assert state == runs[0][1]


def test_resume_from_mid_stream_with_an_example_waiting(sources):
    with loader(sources, num_workers=2) as data_loader:
        for _ in range(3):
            data_loader()
        assert data_loader.batcher.waiting is not None  # the state is before an example already read
        state = json.loads(json.dumps(data_loader.state_dict()))
        expected = [data_loader() for _ in range(5)]
        after = data_loader.state_dict()
        data_loader.load_state_dict(state)  # the same loader, its workers restarted
        _assert_same([data_loader() for _ in range(5)], expected)
    for workers in (0, 2):
        with loader(sources, num_workers=workers) as resumed:
            resumed.load_state_dict(state)
            _assert_same([resumed() for _ in range(5)], expected)
            assert resumed.state_dict() == after


def test_reshard_rule():
    saved = [
        {"position": 40, "drawn": [10, 30], "skipped": {"image": 2}, "rank": 0, "world_size": 2},
        {"position": 31, "drawn": [8, 23], "skipped": {"image": 1, "too long": 4}, "rank": 1, "world_size": 2},
    ]
    assert reshard(saved, 2) == saved
    one = reshard(saved, 1)
    assert one == [
        {"position": 31, "drawn": [8, 23], "skipped": {"image": 3, "too long": 4}, "rank": 0, "world_size": 1}
    ]
    four = reshard(saved, 4)
    assert [s["rank"] for s in four] == [0, 1, 2, 3] and {s["position"] for s in four} == {31}
    assert [s["skipped"] for s in four] == [{"image": 2}, {"image": 1, "too long": 4}, {}, {}]
    two = reshard(one, 2)
    assert [(s["position"], s["drawn"], s["world_size"]) for s in two] == [(31, [8, 23], 2)] * 2
    with pytest.raises(ValueError, match="rank order"):
        reshard(saved[::-1], 1)


@pytest.mark.parametrize("old,new", [(2, 1), (2, 4), (1, 2)])
def test_resharding_loses_no_item_and_repeats_within_the_bound(old, new, tmp_path):
    sources = write_data(tmp_path, n=400)[1:]  # text only: every record has its own tokens
    index = _stream_index(sources, 400)
    consumed, states = [], []
    for r in range(old):
        data_loader = loader(sources, r, old)
        consumed += _items(data_loader, index, 2 + 2 * r)  # the ranks stop at different positions
        states.append(data_loader.state_dict())
    m, M = min(s["position"] for s in states), max(s["position"] for s in states)
    again, ends = [], []
    for j, state in enumerate(reshard(states, new)):
        with loader(sources, j, new, num_workers=2 if j == 0 else 0) as data_loader:
            data_loader.load_state_dict(state)
            items = _items(data_loader, index, 8)
            assert all(k >= m and k % new == j for k in items)
            again += items
            ends.append(data_loader.state_dict()["position"])
    assert len(set(again)) == len(again)  # the new ranks share nothing
    covered = min(ends)
    assert M <= covered < 400
    unusable = {3, 10}  # the two bad lines' stream items are skipped, not consumed
    bad = {index[(0, i)] for i in unusable if (0, i) in index}
    assert set(range(covered)) - bad <= set(consumed) | set(again)  # no item lost
    repeats = len(set(consumed) & set(again))
    assert repeats == sum(
        1 for r, s in enumerate(states) for k in range(m, s["position"]) if k % old == r and k not in bad
    )
    assert repeats <= M - m and (repeats > 0) == (old > 1)


def test_ranks_with_workers_share_no_item_and_miss_none(tmp_path):
    sources = write_data(tmp_path, n=200)[1:]
    index = _stream_index(sources, 200)
    items, ends = [], []
    for rank in range(2):
        with loader(sources, rank, 2, num_workers=2) as data_loader:
            items.append(_items(data_loader, index, 3))
            ends.append(data_loader.state_dict()["position"])
        assert all(k % 2 == rank for k in items[rank])
    assert not set(items[0]) & set(items[1])
    bad = {index[(0, 3)], index[(0, 10)]}
    assert set(items[0]) | set(items[1]) == set(range(min(ends))) - bad | {
        k for k in items[0] + items[1] if k >= min(ends)
    }


def test_a_state_of_another_world_size_needs_reshard(sources):
    with loader(sources, rank=0, world_size=2) as data_loader:
        state = data_loader.state_dict()
    with pytest.raises(ValueError, match="reshard"):
        loader(sources).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        loader(sources, num_workers=-1)


def test_a_worker_that_raises_or_dies_is_a_clear_error(sources):
    with (
        loader(sources, num_workers=2, processor=processor(FailingImages)) as data_loader,
        pytest.raises(
            RuntimeError, match=r"data worker \d of rank 0 failed on .*train\.jsonl line \d: RuntimeError: boom"
        ),
    ):
        for _ in range(20):
            data_loader()
    with loader(sources, num_workers=2) as data_loader:
        data_loader()
        os.kill(data_loader.blend._procs[1].pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"data worker 1 of rank 0 exited unexpectedly \(exit code -9;"):
            for _ in range(100):
                data_loader()


@needs_proc
def test_closing_ends_the_workers(sources):
    data_loader = loader(sources, num_workers=2)
    data_loader()
    pids = [p.pid for p in data_loader.blend._procs]
    assert len(pids) == 2 and not _gone(pids, within=0.2)
    data_loader.close()
    assert _gone(pids)
    data_loader()  # a later batch starts new workers
    assert _gone(pids) and len(data_loader.blend._procs) == 2
    data_loader.close()


@needs_proc
def test_no_process_is_left_after_ctrl_c_or_kill_9(tmp_path):
    runs = {}
    for mode in ("interrupt", "wait"):
        (tmp_path / mode).mkdir()
        runs[mode] = subprocess.Popen(  # stderr to a file: a pipe nobody reads until the end could fill
            [PY, str(HERE / "loader_data.py"), mode, str(tmp_path / mode), str(tmp_path / mode)],
            env=ENV,
            stderr=(tmp_path / f"{mode}.err").open("wb"),
        )
    pids = {}
    for mode, proc in runs.items():
        deadline = time.time() + 60
        while not (tmp_path / mode / "pids.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        pids[mode] = json.loads((tmp_path / mode / "pids.json").read_text())
        assert len(pids[mode]) >= 3  # the fork server and two workers
    runs["wait"].kill()
    for mode, proc in runs.items():
        proc.wait(timeout=60)
        assert _gone(pids[mode]), (mode, pids[mode])
    stderr = (tmp_path / "interrupt.err").read_bytes()
    assert b"KeyboardInterrupt" in stderr and b"Timeout (0:00:40)!" not in stderr, stderr.decode()[-3000:]
    assert runs["interrupt"].returncode != 0


def test_workers_under_torchrun_after_gloo_init(sources, tmp_path):
    data = Path(sources[0].path).parent
    script = [str(HERE / "loader_data.py"), "torchrun", str(data), str(tmp_path)]
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", *script]
    subprocess.run(cmd, check=True, env=ENV, capture_output=True, timeout=120)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        with loader(sources, rank, 2) as data_loader:
            _assert_same(saved["batches"], [data_loader() for _ in range(4)])
            assert saved["state"] == data_loader.state_dict()
