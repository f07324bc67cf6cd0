"""Config schema: valid files load, every kind of mistake is named with its path."""
import subprocess
import sys
from pathlib import Path

import pytest

from agecam.config import ConfigError, load, parse, secret_free

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "example.yaml"])
def test_shipped_configs_are_valid(name):
    # given the configs we ship, when loaded, then they validate
    cfg = load(ROOT / "config" / name)
    assert cfg.cameras, f"{name} has no cameras"


@pytest.mark.parametrize("doc, expected", [
    ({"cameras": [{"name": "a", "source": "demo"}, {"name": "b", "sorce": "x.mp4"}]}, "cameras[1].sorce: unknown field"),
    ({"cameras": [{"name": "a", "source": "demo"}], "events": {"bind": "localhost:1"}}, "events.bind: expected tcp://"),
    ({"cameras": [{"name": "a", "source": "demo"}], "detector": {"kind": "yolo"}}, "detector.kind: must be one of 'mtcnn' or 'scrfd'"),
    ({"cameras": [{"name": "a", "source": "demo"}], "detector": {"min_face_px": "big"}}, "detector.min_face_px: Input should be a valid integer"),
    ({"cameras": [{"name": "a", "source": "demo"}, {"name": "a", "source": 1}]}, "cameras[1].name: duplicate camera name 'a'"),
    ({"cameras": []}, "cameras: List should have at least 1 item"),
    ({"cameras": [{"name": "a", "source": "demo"}], "preview": {"bind": "0.0.0.0:8080"}}, "preview.token: required"),
    ({"cameras": [{"name": "a", "source": "demo"}], "detector": {"kind": "scrfd"}}, "detector.model: required"),
    ({"cameras": [{"name": "a", "source": "demo"}], "bogus": 1}, "bogus: unknown field"),
    ({"cameras": [{"name": "a b", "source": "demo"}]}, "cameras[0].name: String should match pattern"),
])
def test_errors_name_their_field(doc, expected):
    # given a config with one mistake, when parsed, then the error names the field and what is allowed
    with pytest.raises(ConfigError) as exc:
        parse(doc)
    assert any(e.startswith(expected) for e in exc.value.errors), f"expected {expected!r} in {exc.value.errors}"


def test_numeric_source_becomes_camera_index():
    cfg = parse({"cameras": [{"name": "usb", "source": "0"}]})
    assert cfg.cameras[0].source == 0


def test_token_allows_public_bind():
    cfg = parse({"cameras": [{"name": "a", "source": "demo"}], "preview": {"bind": "0.0.0.0:8080", "token": "t"}})
    assert cfg.preview.token == "t"


@pytest.mark.parametrize("url, secret", [
    ("rtsp://admin:hunter2@10.0.0.5:554/s1", "hunter2"),
    ("rtsp://cam.local/s1?token=abc123&x=1", "abc123"),
    ("http://u:p%40ss@h/x", "p%40ss"),
])
def test_secret_free_removes_credentials(url, secret):
    assert secret not in secret_free(url), secret_free(url)


def _check(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    return subprocess.run([sys.executable, "-m", "agecam.cli", "config", "check", str(f)],
                          capture_output=True, text=True, cwd=ROOT)


def test_config_check_cli_ok(tmp_path):
    r = _check(tmp_path, "cameras:\n  - {name: lobby, source: demo}\n")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_config_check_cli_lists_every_error(tmp_path):
    r = _check(tmp_path, "cameras:\n  - {name: a, source: demo}\n  - {name: b, sorce: x}\nevents: {bind: nowhere}\n")
    assert r.returncode == 2, r.stderr
    assert "cameras[1].sorce: unknown field" in r.stderr and "events.bind:" in r.stderr, r.stderr


def test_config_check_cli_yaml_syntax(tmp_path):
    r = _check(tmp_path, "cameras: [\n  {name: a\n")
    assert r.returncode == 2 and "YAML syntax error at line" in r.stderr, r.stderr
