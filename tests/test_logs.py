"""The command's log handler: rank 0 writes info, every rank writes warnings, installing it twice writes once."""

import logging

import pytest

from nvlm.cli import main
from nvlm.logs import RankFilter, setup_logging

LOG = logging.getLogger("nvlm.test_logs")


@pytest.fixture(autouse=True)
def restore_logging():
    root, nvlm = logging.getLogger(), logging.getLogger("nvlm")
    handlers, level = list(root.handlers), nvlm.level
    yield
    root.handlers[:] = handlers
    nvlm.setLevel(level)


def _emit() -> None:
    LOG.info("step 1 loss 2.5")
    LOG.warning("skipping a.jsonl line 3")


def test_rank_1_drops_info_and_keeps_warnings_with_its_rank(capsys):
    setup_logging(rank=1)
    _emit()
    assert capsys.readouterr().err.splitlines() == ["[rank 1] warning: skipping a.jsonl line 3"]


def test_rank_0_writes_info_bare_and_once_when_installed_twice(capsys):
    setup_logging(rank=0)
    setup_logging(rank=0)  # the demo runs several commands in one process
    _emit()
    assert capsys.readouterr().err.splitlines() == ["step 1 loss 2.5", "warning: skipping a.jsonl line 3"]


def test_the_rank_comes_from_torchrun_and_the_level_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("NVLM_LOG_LEVEL", "error")
    setup_logging()
    _emit()
    LOG.error("data worker 0 of rank 3 failed")
    assert capsys.readouterr().err.splitlines() == ["[rank 3] error: data worker 0 of rank 3 failed"]


def test_the_filter_alone():
    record = logging.LogRecord("nvlm.x", logging.INFO, __file__, 1, "m", None, None)
    warning = logging.LogRecord("nvlm.x", logging.WARNING, __file__, 1, "m", None, None)
    assert RankFilter(0).filter(record) and not RankFilter(1).filter(record) and RankFilter(1).filter(warning)


def test_a_bad_level_is_one_line_from_the_command(monkeypatch, capsys):
    monkeypatch.setenv("NVLM_LOG_LEVEL", "loud")
    assert main(["eval", "--list-tasks"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["nvlm: error: NVLM_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"]
