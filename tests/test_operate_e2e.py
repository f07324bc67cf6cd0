"""Operating the real daemon: sd_notify + watchdog, a real Prometheus, headless Chromium, token, SIGHUP reload.

These run `agecam run` on the demo source with the fetched models, under the unit's seccomp sandbox
(SystemCallFilter=@system-service, MemoryDenyWriteExecute=yes, reproduced by tests/test_systemd.py).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tests.helpers import Daemon, NotifyListener, free_port, http_get, need_tool, wait_for

pytestmark = pytest.mark.slow

TOKEN = "e2e-preview-token-4f1c"
STABLE_BGR, UNSTABLE_BGR = (60, 220, 60), (0, 170, 255)


def demo_config(models_dir: Path, *, preview_bind: str, token: str | None, metrics_port: int) -> dict:
    return {
        "cameras": [{"name": "lobby", "source": "demo", "loop": True}],
        "events": {"bind": f"tcp://127.0.0.1:{free_port()}"},
        "metrics": {"bind": f"127.0.0.1:{metrics_port}"},
        "preview": {"bind": preview_bind, "max_fps": 8, **({"token": token} if token else {})},
        "runtime": {"models_dir": str(models_dir), "log_format": "text"},
    }


@pytest.fixture(scope="module")
def daemon(models_dir, tmp_path_factory):
    """One sandboxed demo run for the scrape, browser and token tests: preview on every address with a token."""
    tmp = tmp_path_factory.mktemp("operate")
    preview_port, metrics_port = free_port(), free_port()
    d = Daemon(tmp, demo_config(models_dir, preview_bind=f"0.0.0.0:{preview_port}", token=TOKEN,
                                metrics_port=metrics_port))
    d.preview_port, d.metrics_port = preview_port, metrics_port
    try:
        d.wait_ready()
        yield d
    finally:
        code = d.stop()
        assert code == 0, f"daemon exited {code} on SIGTERM:\n{d.log()[-3000:]}"
        assert d.notify.with_field("STOPPING=1"), "no STOPPING=1 on shutdown"


def test_daemon_reports_ready_status_and_pings_the_watchdog(daemon):
    # given a running daemon under a 4 s systemd watchdog
    t0 = time.monotonic()
    # when we wait for three pings (a real-time property: waited for with a generous deadline, not a short window)
    pings = wait_for(lambda: (p := daemon.notify.with_field("WATCHDOG=1", since_s=t0)) and len(p) >= 3 and p, 60,
                     "3 WATCHDOG=1 under a 4 s watchdog")
    # then they come about every 2 s (half the watchdog), and the daemon keeps a one-line STATUS
    gaps = np.diff([t for t, _ in pings])
    assert float(np.median(gaps)) < 4.0, f"pings {np.round(gaps, 2)} s apart under a 4 s watchdog:\n{daemon.log()[-2000:]}"
    statuses = [m for _, m in daemon.notify.messages if m.startswith("STATUS=")]
    assert statuses and all("\n" not in s for s in statuses), f"no one-line STATUS: {statuses!r}"
    assert daemon.proc.poll() is None


def test_real_prometheus_scrapes_the_demo_run(daemon, tmp_path):
    # given a real Prometheus scraping the daemon every second
    prometheus, promtool = need_tool("prometheus"), need_tool("promtool")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "agecam", "static_configs": [{"targets": [f"127.0.0.1:{daemon.metrics_port}"]}]}],
    }))
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    api = f"http://127.0.0.1:{port}/api/v1/query?query="

    def query(q: str) -> dict[str, float]:
        code, body = http_get(api + urllib.parse.quote(q))
        data = json.loads(body)
        assert code == 200 and data["status"] == "success", f"query {q!r} failed: {body[:300]!r}"
        return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in data["data"]["result"]}

    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200, 60, "Prometheus to be ready")
        # when it has scraped for a while
        wait_for(lambda: list(query('up{job="agecam"}').values()) == [1.0], 30, "a successful scrape (up == 1)")
        first = wait_for(lambda: query('agecam_frames_captured_total{camera="lobby"}'), 30, "frames captured series")
        time.sleep(3)
        later = query('agecam_frames_captured_total{camera="lobby"}')
        # then the expected series are there with sensible values
        assert list(later.values())[0] > list(first.values())[0] > 0, f"frames captured not increasing: {first} -> {later}"
        assert list(query('agecam_camera_up{camera="lobby"}').values()) == [1.0], "camera not up"
        wait_for(lambda: list(query('agecam_faces_detected_total{camera="lobby"}').values())[0] > 0, 30, "faces > 0")
        wait_for(lambda: list(query('sum(agecam_age_samples_total)').values())[0] > 0, 30, "age samples > 0")
        rate = query('rate(agecam_frames_processed_total{camera="lobby"}[5s])')
        assert rate and 0.5 < list(rate.values())[0] < 200, f"implausible processing rate {rate}"
        p95 = query('histogram_quantile(0.95, sum by (le) (rate(agecam_stage_duration_seconds_bucket{stage="detect"}[10s])))')
        assert p95 and 0 < list(p95.values())[0] < 5, f"implausible detect latency p95 {p95}"
        build = query("agecam_build_info")
        assert build and "CPUExecutionProvider" in list(build)[0], f"build info missing providers: {build}"
        info = [json.loads(k) for k in query("agecam_model_info")]
        assert len(info) == 1 and info[0].get("age_model") == "cydral-age-v1" and info[0].get("detector_kind") == \
            "mtcnn", f"model info does not name the models running: {info}"
        # and the live endpoint passes promtool's lint
        code, text = http_get(f"http://127.0.0.1:{daemon.metrics_port}/metrics")
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr
        print(f"scrape size: {len(text)} bytes, {sum(1 for l in text.splitlines() if l and l[0] != '#')} samples")
    finally:
        prom.terminate()
        prom.wait(20)
        log.close()


class WebDriver:
    """Just enough W3C WebDriver over HTTP to drive Debian's chromedriver + headless Chromium."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.proc = subprocess.Popen([need_tool("chromedriver"), f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_for(lambda: self._call("GET", "/status")["value"]["ready"], 30, "chromedriver")
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chromium'}", "--window-size=900,700"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": need_tool("chromium"), "args": args}}}}
        self.session = self._call("POST", "/session", caps, timeout_s=60)["value"]["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None, timeout_s: float = 30) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"webdriver {method} {path}: {e.code} {e.read()[:500]!r}") from None

    def s(self, method: str, path: str, body: dict | None = None) -> object:
        return self._call(method, f"/session/{self.session}{path}", body)["value"]

    def element_png(self, css: str) -> np.ndarray:
        el = self.s("POST", "/element", {"using": "css selector", "value": css})
        png = base64.b64decode(self.s("GET", f"/element/{next(iter(el.values()))}/screenshot"))
        return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            self.proc.wait(10)


def _near(img: np.ndarray, bgr: tuple[int, int, int], tol: int = 45) -> int:
    return int(np.all(np.abs(img.astype(int) - bgr) <= tol, axis=2).sum())


def test_headless_chromium_shows_annotated_video(daemon, tmp_path):
    # given headless Chromium on the preview page (token in the URL)
    wd = WebDriver(tmp_path)
    try:
        wd.s("POST", "/url", {"url": f"http://127.0.0.1:{daemon.preview_port}/?token={TOKEN}"})
        assert "lobby" in wd.s("POST", "/execute/sync", {"script": "return document.body.innerText", "args": []})
        # when the MJPEG <img> has decoded frames
        wait_for(lambda: wd.s("POST", "/execute/sync", {
            "script": "const i = document.getElementById('stream-lobby'); return i.complete !== undefined && "
                      "i.naturalWidth", "args": []}) == 640, 30, "the stream image to show 640-px frames")

        # then the screenshot of the video shows annotation boxes (stable green or unstable orange)
        def annotated():
            shot = wd.element_png("#stream-lobby")
            cv2.imwrite(str(tmp_path / "preview.png"), shot)
            boxes = _near(shot, STABLE_BGR) + _near(shot, UNSTABLE_BGR)
            return (shot, boxes) if boxes >= 300 else None
        shot, boxes = wait_for(annotated, 45, "box-coloured pixels in the screenshot", every_s=1.0)
        # and the status line: a darkened band at the top with bright text
        band = shot[: max(8, shot.shape[0] // 24)]
        assert (band.max(axis=2) > 200).mean() > 0.01 and band.mean() < 110, "no status line at the top of the video"
        page = wd.element_png("body")
        cv2.imwrite(str(tmp_path / "page.png"), page)
        if os.environ.get("AGECAM_ARTIFACTS"):
            shutil.copy(tmp_path / "page.png", Path(os.environ["AGECAM_ARTIFACTS"]) / "preview_page.png")
        state = wd.s("POST", "/execute/sync", {"script": "return document.getElementById('state-lobby').textContent",
                                                "args": []})
        assert state == "online", f"page shows camera state {state!r}"
    finally:
        wd.close()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP listener on port, from /proc/net/tcp{,6}."""
    found = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":
                found.add(addr)
    return found


@pytest.mark.parametrize("suffix, headers, expected", [
    ("", {}, 401),
    ("?token=wrong", {}, 401),
    ("", {"Authorization": "Bearer wrong"}, 401),
    (f"?token={TOKEN}", {}, 200),
    ("", {"Authorization": f"Bearer {TOKEN}"}, 200),
])
@pytest.mark.parametrize("route", ["", "healthz", "cameras/lobby/snapshot.jpg"])
def test_off_loopback_preview_refuses_requests_without_the_token(daemon, route, suffix, headers, expected):
    # given the preview bound to every address (0.0.0.0) with a token
    assert "00000000" in _listening_addresses(daemon.preview_port), "preview is not bound to 0.0.0.0"
    # when a request comes with no, a wrong, or the right token
    code, body = http_get(f"http://127.0.0.1:{daemon.preview_port}/{route}{suffix}", headers)
    # then only the right token is served, and the token never reaches the log
    assert code == expected, f"/{route}{suffix} {headers}: {code}, expected {expected}"
    assert TOKEN not in daemon.log(), "the preview token appeared in the daemon's log"


def test_sighup_applies_a_valid_config_and_keeps_running_on_a_broken_one(models_dir, tmp_path):
    # given a running daemon with preview max_fps 8
    preview_port, metrics_port = free_port(), free_port()
    cfg = demo_config(models_dir, preview_bind=f"127.0.0.1:{preview_port}", token=None, metrics_port=metrics_port)
    d = Daemon(tmp_path, cfg)
    health = f"http://127.0.0.1:{preview_port}/healthz"

    def preview_fps():
        code, body = http_get(health)
        return json.loads(body)["preview"]["max_fps"] if code in (200, 503) else None

    try:
        d.wait_ready()
        assert wait_for(preview_fps, 20, "healthz") == 8
        # when the config changes to max_fps 3 and SIGHUP is sent
        cfg["preview"]["max_fps"] = 3
        d.write_config(cfg)
        t_hup = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        # then the new value is applied, with RELOADING=1 then READY=1 sent to systemd
        wait_for(lambda: preview_fps() == 3, 120, "max_fps 3 after SIGHUP")
        wait_for(lambda: d.notify.with_field("READY=1", since_s=t_hup), 30, "READY=1 after the reload")
        assert d.notify.with_field("RELOADING=1", since_s=t_hup), "no RELOADING=1 on SIGHUP"
        wait_for(lambda: http_get(health)[0] == 200, 60, "healthz 200 after the reload")
        # when a broken config (schema error, then YAML syntax error) is sent with SIGHUP
        for broken, needle in ((dict(cfg, preview={**cfg["preview"], "max_fps": -1}), "preview.max_fps"),
                               ("cameras: [\n  - name: lobby\n    source: demo\n  oops: {\n", "YAML")):
            before = d.log().count("reload refused")
            d.write_config(broken)
            d.proc.send_signal(signal.SIGHUP)
            # then a clear error names the problem and the daemon keeps running on the old config
            line = wait_for(lambda: [l for l in d.log().splitlines()[-400:] if "reload refused" in l][before:],
                            30, f"a 'reload refused' log line for {needle}")
            assert needle in line[0], f"refusal does not name the problem ({needle}): {line[0]}"
            time.sleep(2)
            assert d.proc.poll() is None, f"daemon died on a broken config:\n{d.log()[-3000:]}"
            assert preview_fps() == 3 and http_get(health)[0] == 200, "old config not kept after a broken reload"
    finally:
        code = d.stop()
    assert code == 0, f"daemon exited {code}:\n{d.log()[-3000:]}"


def test_a_stalled_pipeline_stops_the_watchdog_pings(models_dir, tmp_path):
    """In-process: a real App on the demo source whose pipeline thread is blocked by an injected frame tap."""
    from agecam.config import parse
    from agecam.daemon.app import App
    from agecam.daemon.systemd import Notifier, WatchdogPinger

    # given a real daemon whose frame tap can block its pipeline thread, and a 1 s watchdog
    listener = NotifyListener(tmp_path / "notify.sock")
    cfg = parse({"cameras": [{"name": "lobby", "source": "demo", "loop": True}],
                 "events": {"bind": f"tcp://127.0.0.1:{free_port()}"}, "metrics": {"bind": None},
                 "preview": {"bind": None}, "runtime": {"models_dir": str(models_dir), "heartbeat_timeout_s": 1.5}})
    flowing, stalled = threading.Event(), threading.Event()
    flowing.set()

    def tap(frame, dets):
        if not flowing.is_set():
            stalled.set()
            flowing.wait(30)  # the stall: the pipeline thread blocks here

    notifier = Notifier({"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000"})
    app = App(cfg, notifier=notifier, frame_tap=tap)
    stop = threading.Event()
    try:
        app.start()
        pinger = WatchdogPinger(notifier, app.healthy, stop)
        assert pinger.start(), "no watchdog thread although WATCHDOG_USEC is set"
        # when frames flow, then WATCHDOG=1 keeps arriving (every 0.5 s; waited for, not sampled in a window)
        wait_for(lambda: app.pipelines["lobby"].stats.frames > 3, 60, "frames through the pipeline")
        t0 = time.monotonic()
        wait_for(lambda: len(listener.with_field("WATCHDOG=1", since_s=t0)) >= 3, 30, "3 pings while the pipeline runs")
        # when the pipeline stalls, then after the heartbeat timeout the pinger withholds, and no ping is sent
        flowing.clear()
        wait_for(stalled.is_set, 30, "the pipeline to reach the stall")
        wait_for(lambda: pinger.withholding, 30, "the pinger to withhold once the heartbeat is stale")
        pings_at_stall = pinger.pings
        time.sleep(2.0)  # four ping periods
        assert pinger.pings == pings_at_stall and pinger.withholding, "WATCHDOG=1 continued while the pipeline was stalled"
        # when it recovers, then pings resume
        flowing.set()
        t2 = time.monotonic()
        wait_for(lambda: listener.with_field("WATCHDOG=1", since_s=t2), 30, "pings to resume")
    finally:
        flowing.set()
        stop.set()
        app.stop()
        listener.close()
