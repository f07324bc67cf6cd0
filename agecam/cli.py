"""The `agecam` command: argument parsing and dispatch only."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module offers register(subparsers) that adds its sub-commands with set_defaults(func=...).
# register() must not import torch: heavy imports happen inside the command function.
COMMAND_MODULES = (
    "agecam.daemon.app",  # run
    "agecam.events_cli",  # events
    "agecam.config_cli",  # config check
    "agecam.models.fetch",  # models fetch
    "agecam.training.cli",  # eda, split, train, evaluate
    "agecam.export.cli",  # export
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(prog="agecam", description="Real-time age estimation daemon, with its training and export tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
