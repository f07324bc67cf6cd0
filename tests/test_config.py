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
    # then every listener is on loopback, and the demo config runs the embedded demo scene
    assert cfg.events.bind.startswith("tcp://127.0.0.1:"), cfg.events.bind
    assert all(b is None or b.startswith("127.0.0.1:") for b in (cfg.metrics.bind, cfg.preview.bind)), cfg
    if name == "demo.yaml":
        assert [(c.name, c.source, c.loop) for c in cfg.cameras] == [("demo", "demo", True)], cfg.cameras


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
    # given a public preview bind, when it has a token, then it loads; without one, it is refused
    doc = {"cameras": [{"name": "a", "source": "demo"}], "preview": {"bind": "0.0.0.0:8080", "token": "t"}}
    assert parse(doc).preview.bind == "0.0.0.0:8080"
    del doc["preview"]["token"]
    with pytest.raises(ConfigError):
        parse(doc)


@pytest.mark.parametrize("url, expected", [
    ("rtsp://admin:hunter2@10.0.0.5:554/s1", "rtsp://***@10.0.0.5:554/s1"),
    ("rtsp://cam.local/s1?token=abc123&x=1", "rtsp://cam.local/s1?token=***&x=1"),
    ("http://u:p%40ss@h/x", "http://***@h/x"),
    ("rtsp://10.0.0.5/s1", "rtsp://10.0.0.5/s1"),
])
def test_secret_free_removes_credentials_and_keeps_the_rest(url, expected):
    assert secret_free(url) == expected


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
