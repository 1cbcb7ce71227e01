"""CPU training never runs more compute threads than the cores its data workers leave free."""

import torch

from nvlm.train import loop


def _cpus(monkeypatch, n, torch_default):
    monkeypatch.setattr(loop.os, "sched_getaffinity", lambda pid: set(range(n)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_default)


def test_two_cores_with_a_worker_get_one_thread(monkeypatch):
    _cpus(monkeypatch, 2, 2)
    assert loop.cpu_threads(1) == 1 and loop.cpu_threads(2) == 1  # never below one
    assert loop.cpu_threads(0) == 2


def test_many_cores_keep_torchs_default_and_ranks_share_them(monkeypatch):
    _cpus(monkeypatch, 16, 8)
    assert loop.cpu_threads(2) == 8
    assert loop.cpu_threads(2, ranks_here=4) == 2  # 4 cores a rank, 2 of them for its workers
