"""The front door: `agecam --version`, help text on every option with its default, documented exit codes."""
from __future__ import annotations

import argparse
import re
import subprocess
import pytest

from agecam import __version__, exits
from agecam.cli import build_parser, main
from tests.helpers import ROOT, agecam_cmd


def _parsers(p: argparse.ArgumentParser, path: tuple[str, ...] = ("agecam",)):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _parsers(sp, path + (name,))


def test_version_prints_and_exits_0():
    # given the installed console script, when asked for its version, then it prints it and exits 0
    res = subprocess.run([*agecam_cmd(), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"agecam {__version__}", (res.returncode, res.stdout)


def test_every_option_of_every_command_has_help_and_shows_its_default():
    # given the full parser, when every (sub-)command is walked
    missing = []
    for path, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if not a.help:
                missing.append(f"{' '.join(path)} {a.option_strings or a.dest}")
        # then each sub-command's help lists the defaults
        if len(path) > 1 and any(a.default not in (None, False, argparse.SUPPRESS) for a in p._actions
                                 if a.option_strings and a.help):
            assert "(default:" in p.format_help(), f"{' '.join(path)} --help does not show defaults"
    assert not missing, f"options without help text: {missing}"


def test_exit_codes_are_listed_in_help_and_readme():
    # given the exit-code table, then --help and the README list every code with its meaning
    text = build_parser().format_help()
    readme = (ROOT / "README.md").read_text()
    for code, _meaning in exits.TABLE:
        assert re.search(rf"^\s*{code}\s", text, re.M), f"exit code {code} missing from agecam --help"
        assert re.search(rf"\|\s*`?{code}`?\s*\|", readme), f"exit code {code} missing from the README's table"


@pytest.mark.parametrize("argv, code", [
    (["config", "check", "/nonexistent/agecam.yaml"], exits.USAGE),
    (["events", "--connect", "tcp://127.0.0.1:9", "--timeout", "0.2"], exits.NO_EVENTS),
])
def test_commands_return_the_documented_codes(argv, code, capsys):
    assert main(argv) == code, capsys.readouterr()


def test_argument_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["run"])  # --config is required
    assert exc.value.code == exits.USAGE


def test_schema_ships_inside_the_package():
    # given the installed package, then the event schema is a package resource with a URI $id
    import json
    from importlib.resources import files

    schema = json.loads(files("agecam").joinpath("schemas/event.v1.json").read_text())
    assert schema["$id"] == "urn:agecam:schema:event:v1", schema.get("$id")
    assert "90 %" in schema["allOf"][0]["else"]["properties"]["age"]["oneOf"][1]["properties"]["low"]["description"]
    # and the licence the package metadata names is the file beside it
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
