"""Config schema: valid files load, every kind of mistake is named with its path."""
import subprocess
import sys
from pathlib import Path

import pytest

from agecam.config import ConfigError, load, parse
from agecam.secrets import secret_free

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "example.yaml"])
def test_shipped_configs_are_valid(name, monkeypatch):
    # given the configs we ship (the example takes its RTSP password from the environment), when loaded, then valid
    monkeypatch.setenv("AGECAM_ENTRANCE_PASSWORD", "from-the-environment")
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
    doc = {"cameras": [{"name": "a", "source": "demo"}], "preview": {"bind": "0.0.0.0:8080", "token": "t" * 16}}
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


def _cam(**kw) -> dict:
    return {"cameras": [{"name": "a", "source": "demo", **kw}]}


@pytest.mark.parametrize("doc, expected", [
    (_cam(read_timeout_s=float("inf")), "cameras[0].read_timeout_s: Input should be a finite number"),
    (_cam(open_timeout_s=float("nan")), "cameras[0].open_timeout_s: Input should be a finite number"),
    ({**_cam(), "detector": {"full_frame_interval_s": float("inf")}}, "detector.full_frame_interval_s: Input should be a finite"),
    ({**_cam(), "detector": {"track_check_interval_s": 1.0}},
     "tracker.lost_track_buffer_s: must be at least twice detector.track_check_interval_s (1.5 < 2 x 1)"),
    ({**_cam(), "detector": {"motion_threshold": 0}}, "detector.motion_threshold: Input should be greater than or equal to 1"),
    ({**_cam(), "detector": {"cut_check_interval_s": -1}}, "detector.cut_check_interval_s: Input should be greater than or equal to 0"),
    ({**_cam(), "tracker": {"sure_score": 0.8}}, "tracker.sure_score: must be above tracker.high_score (0.8 <= 0.8)"),
    (_cam(decode_threads=-1), "cameras[0].decode_threads: Input should be greater than or equal to 0"),
    (_cam(reconnect_min_s=10, reconnect_max_s=1), "cameras[0]: reconnect_min_s (10) must not exceed reconnect_max_s"),
    ({**_cam(), "age": {"stable_min_samples": 80, "max_samples": 60}}, "age: stable_min_samples (80) must not exceed"),
    ({**_cam(), "metrics": {"bind": "127.0.0.1:99999"}}, "metrics.bind: expected HOST:PORT with a port from 0 to 65535"),
    ({**_cam(), "events": {"bind": "tcp://127.0.0.1:70000"}}, "events.bind: expected tcp://HOST:PORT (port 0-65535)"),
    ({**_cam(), "preview": {"token": "short"}}, "preview.token: must be at least 16 characters"),
    ({"cameras": [{"name": "a", "source": "demo", "enabled": False}]}, "cameras: every camera is disabled"),
    (_cam(source=True), "cameras[0].source: Input should be a valid"),
    (_cam(loop="yes"), "cameras[0].loop: Input should be a valid boolean"),
    ({**_cam(), "runtime": {"intra_op_threads": 100000}}, "runtime.intra_op_threads: Input should be less than or equal to 64"),
    ({**_cam(), "events": {"queue_size": 10 ** 9}}, "events.queue_size: Input should be less than or equal to 1000000"),
    ({**_cam(), "events": {"hwm": 10 ** 9}}, "events.hwm: Input should be less than or equal to 1000000"),
    ({**_cam(), "age": {"max_batch": 100000}}, "age.max_batch: Input should be less than or equal to 256"),
    ({**_cam(), "preview": {"bind": "127.evil.example:8080"}}, "preview.token: required when bind is not a loopback"),
    ({**_cam(), "preview": {"bind": "0.0.0.0:8080"}}, "preview.token: required when bind is not a loopback"),
    ({**_cam(), "metrics": {"bind": "0.0.0.0:9108"}}, "metrics.token: required when bind is not a loopback"),
    ({**_cam(), "events": {"bind": "tcp://0.0.0.0:5556"}}, "events.bind: a non-loopback address needs events.curve"),
    ({**_cam(), "events": {"bind": "tcp://*:5556"}}, "events.bind: a non-loopback address needs events.curve"),
])
def test_nonsense_values_are_refused_naming_the_field(doc, expected):
    # given a config with one nonsense value, when parsed, then it is refused and the error names the field
    with pytest.raises(ConfigError) as exc:
        parse(doc)
    assert any(e.startswith(expected) for e in exc.value.errors), f"expected {expected!r} in {exc.value.errors}"


@pytest.mark.parametrize("bind", ["127.0.0.1:8080", "localhost:8080", "[::1]:8080", "127.0.0.2:8080"])
def test_loopback_binds_need_no_token(bind):
    assert parse({**_cam(), "preview": {"bind": bind}}).preview.bind == bind


def test_secret_values_are_never_echoed_in_errors():
    # given a numeric token (a type error) and a wrong-type URL field carrying a password
    with pytest.raises(ConfigError) as exc:
        parse({**_cam(), "preview": {"token": 1234567890123456789}})
    # then the error names the field but not the value
    text = exc.value.report()
    assert "preview.token" in text and "1234567890123456789" not in text, text


def test_secrets_come_from_the_environment_and_credentials(tmp_path, monkeypatch):
    # given a config that references an environment variable and a systemd credential, not the secrets themselves
    monkeypatch.setenv("AGECAM_TEST_RTSP_PW", "p@ss:w0rd@x")
    (tmp_path / "preview-token").write_text("tok-from-credential-0123456789\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg_file = tmp_path / "agecam.yaml"
    cfg_file.write_text("cameras:\n  - name: door\n    source: rtsp://admin:${env:AGECAM_TEST_RTSP_PW}@10.0.0.5/s1\n"
                        "preview:\n  bind: 0.0.0.0:8080\n  token: ${cred:preview-token}\n")
    # when loaded
    cfg = load(cfg_file)
    # then the values are resolved, and every one is known as a secret to scrub
    assert cfg.cameras[0].source == "rtsp://admin:p@ss:w0rd@x@10.0.0.5/s1"
    assert cfg.preview.token == "tok-from-credential-0123456789"
    assert {"p@ss:w0rd@x", "tok-from-credential-0123456789"} <= set(cfg.secrets()), cfg.secrets()
    assert secret_free(cfg.cameras[0].source) == "rtsp://***@10.0.0.5/s1"


@pytest.mark.parametrize("text, expected", [
    ("cameras:\n  - name: a\n    source: ${env:AGECAM_SURELY_UNSET}\n",
     "cameras[0].source: environment variable AGECAM_SURELY_UNSET is not set"),
    ("cameras:\n  - name: a\n    source: demo\npreview:\n  token: ${cred:nope}\n", "preview.token: ${cred:nope} needs"),
])
def test_unresolvable_secret_references_name_the_reference(tmp_path, monkeypatch, text, expected):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load(f)
    assert any(e.startswith(expected) for e in exc.value.errors), exc.value.errors


@pytest.mark.parametrize("url, expected", [
    ("rtsp://admin:p@ss@cam/x", "rtsp://***@cam/x"),
    ("rtsp://admin:p@ss:w@rd@10.0.0.5:554/live", "rtsp://***@10.0.0.5:554/live"),
    ("rtsp://cam/x?user=a&pass=hunter2&x=1", "rtsp://cam/x?user=a&pass=***&x=1"),
    ("rtsp://cam/x?pw=hunter2", "rtsp://cam/x?pw=***"),
    ("http://h/x?auth_token=abc&api_key=def", "http://h/x?auth_token=***&api_key=***"),
])
def test_scrubbing_removes_whole_userinfo_and_credential_query_values(url, expected):
    assert secret_free(url) == expected


def test_a_config_that_is_not_utf8_is_refused_not_crashed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"cameras:\n  - name: a\n    source: demo\n# caf\xe9\n")
    with pytest.raises(ConfigError) as exc:
        load(f)
    assert "not UTF-8" in exc.value.errors[0], exc.value.errors
