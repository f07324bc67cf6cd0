"""The test set-up is complete: every part `make test` installs is here, so no test can quietly skip past it."""
from __future__ import annotations

import subprocess

import pytest

from tests.helpers import REQUIRED_LIBRARIES, REQUIRED_MODULES, REQUIRED_TOOLS, need_library, need_module, need_tool
from tests.media import rtsp_server_available


@pytest.mark.parametrize("tool", sorted(REQUIRED_TOOLS))
def test_required_tool_is_installed(tool):
    # given the tools the README's set-up promises, when looked up, then each is on PATH and runs
    path = need_tool(tool)
    flag = "-version" if tool in ("ffmpeg", "ffprobe") else "--help" if tool.startswith("mosquitto") else "--version"
    res = subprocess.run([path, flag], capture_output=True, text=True, timeout=60)
    if tool.startswith("mosquitto"):  # no --version; its help names the version (and exits non-zero)
        assert "version" in res.stdout + res.stderr, f"{tool} is installed but `{tool} --help` failed"
        return
    assert res.returncode == 0, f"{tool} is installed but `{tool} {flag}` failed: {res.stderr[-500:]}"


@pytest.mark.parametrize("library", sorted(REQUIRED_LIBRARIES))
def test_required_library_is_installed(library):
    need_library(library)


@pytest.mark.parametrize("module", sorted(REQUIRED_MODULES))
def test_required_module_imports(module):
    need_module(module)


def test_rtsp_test_server_can_run():
    # given Debian's GStreamer RTSP server and python3-gi, when probed, then it can serve H.264
    why = rtsp_server_available()
    assert why is None, f"the RTSP test server cannot run: {why}"
