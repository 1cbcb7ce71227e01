"""Command-line options made from settings dataclasses (``nvlm.options``): each option's default is written once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from nvlm.cli import build_parser
from nvlm.eval.runner import EvalConfig
from nvlm.options import add_options, from_args, option
from nvlm.serve.limits import MIB, Limits


@dataclass
class Settings:
    path: str = option(help="required in the dataclass, optional on the command line")
    count: int = option(3, "a number")
    ratio: float | None = option(None, "a float or nothing")
    fast: bool = option(False, "a switch")
    mode: str = option("a", "one of two", choices=("a", "b"))
    where: str | None = option(None, "renamed", flag="--dir")
    hidden: int = 7  # no help: no option


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_options(parser, Settings)
    return parser


def test_fields_become_options_with_their_defaults() -> None:
    args = _parser().parse_args(["--path", "p"])
    assert from_args(Settings, args) == Settings(path="p")
    args = _parser().parse_args(
        ["--path", "p", "--count", "5", "--ratio", "0.5", "--fast", "--mode", "b", "--dir", "d"]
    )
    assert from_args(Settings, args, hidden=1) == Settings("p", 5, 0.5, True, "b", "d", 1)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--hidden", "1"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--mode", "c"])


def test_a_field_of_another_type_is_refused() -> None:
    @dataclass
    class Bad:
        items: list[str] = option(help="no option for a list")

    with pytest.raises(TypeError, match=r"Bad\.items"):
        add_options(argparse.ArgumentParser(), Bad)


def test_nvlm_eval_options_are_evalconfigs_fields() -> None:
    args = build_parser().parse_args(["eval", "--model", "m", "--tasks", "chartqa"])
    assert from_args(EvalConfig, args, tasks=["chartqa"]) == EvalConfig(model="m", tasks=["chartqa"])
    args = build_parser().parse_args(
        [
            "eval",
            "--model",
            "m",
            "--tasks",
            "x",
            "--batch-size",
            "3",
            "--profile",
            "nvlm",
            "--quantize",
            "int8",
            "--merge-timeout",
            "9",
        ]
    )
    cfg = from_args(EvalConfig, args, tasks=["x"])
    assert (cfg.batch_size, cfg.profile, cfg.quantize, cfg.merge_timeout) == (3, "nvlm", "int8", 9.0)


def test_nvlm_serve_limits_are_limits_fields() -> None:
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert from_args(Limits, args, max_body_bytes=args.max_body_mb * MIB) == Limits()
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "m",
            "--timeout",
            "5",
            "--image-dir",
            "/x",
            "--allow-remote-images",
            "--max-queue",
            "3",
            "--max-body-mb",
            "1",
        ]
    )
    limits = from_args(Limits, args, max_body_bytes=args.max_body_mb * MIB)
    assert limits == Limits(
        max_body_bytes=MIB, max_queue=3, timeout_s=5.0, allow_remote_images=True, local_image_dir="/x"
    )
