"""The `agecam` command: argument parsing and dispatch only."""
from __future__ import annotations

import argparse
import importlib
import sys

from agecam import __version__, exits

# Each module offers register(subparsers) that adds its sub-commands with set_defaults(func=...).
# register() must not import torch: heavy imports happen inside the command function.
COMMAND_MODULES = (
    "agecam.daemon.run",  # run
    "agecam.events_cli",  # events
    "agecam.config_cli",  # config check
    "agecam.keys",  # keys generate
    "agecam.models.fetch",  # models fetch
    "agecam.training.cli",  # eda, split, train, evaluate
    "agecam.export.cli",  # export
)


class _Parser(argparse.ArgumentParser):
    """Every (sub-)command's parser: help texts show each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in exits.TABLE)
    parser = _Parser(prog="agecam", description="Real-time age estimation daemon, with its training and export tools.",
                     epilog=f"exit codes:\n{codes}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"agecam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or exits.OK)
    except KeyboardInterrupt:
        return exits.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
