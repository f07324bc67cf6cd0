"""`agecam config check`: validate a config file and list every problem with its path."""
from __future__ import annotations

import argparse
from pathlib import Path

from agecam import exits


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("check", help="validate a YAML config; exit 0 when OK, 2 with the list of errors")
    c.add_argument("file", type=Path, help="the YAML config file to check")
    c.set_defaults(func=check_command)


def check_command(args) -> int:
    from agecam.config import load_or_report

    cfg = load_or_report(args.file)
    if cfg is None:
        return exits.USAGE
    names = ", ".join(c.name for c in cfg.cameras)
    print(f"{args.file}: OK ({len(cfg.cameras)} camera(s): {names})")
    return 0
