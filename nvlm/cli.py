"""The ``nvlm`` command: ``nvlm chat --model DIR [--image FILE ...] [QUESTION]``, ``nvlm train``, ...

Each command lives in its own module, imported only when that command runs: ``nvlm data synth`` loads no
torch, ``nvlm train`` no server. ``nvlm --help`` (or an unknown command) imports them all to list them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence

from nvlm.logs import setup_logging

# command -> the module whose ``add_subcommand(sub)`` adds its parser (and sets ``func``)
COMMANDS = {
    "chat": "nvlm.chat",
    "train": "nvlm.train.cli",
    "serve": "nvlm.serve.cli",
    "eval": "nvlm.eval.cli",
    "data": "nvlm.data.cli",
    "demo": "nvlm.demo",
    "convert": "nvlm.mcore.cli",
}


def build_parser(commands: Iterable[str] = COMMANDS) -> argparse.ArgumentParser:
    """The ``nvlm`` parser with the subcommands ``commands`` (default: all)."""
    parser = argparse.ArgumentParser(prog="nvlm", description="NVLM 1.0 in pure PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in commands:
        importlib.import_module(COMMANDS[name]).add_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser([argv[0]] if argv and argv[0] in COMMANDS else COMMANDS)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra  # `nvlm train --config r.yaml --steps 10`: recipe overrides
    try:
        setup_logging()
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"nvlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
