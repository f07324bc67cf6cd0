"""Two real daemons (instances site-a and site-b, same camera name) publishing into real MQTT and Redis brokers."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from agecam.client import subscribe
from tests.helpers import Daemon, free_port, http_get, need_module, need_tool, wait_for

pytestmark = pytest.mark.slow

INSTANCES = ("site-a", "site-b")


def _config(models_dir, instance: str, mosquitto, redis_server, metrics_port: int) -> dict:
    return {"cameras": [{"name": "door", "source": "demo", "loop": True}],
            "events": {"bind": f"tcp://127.0.0.1:{free_port()}", "update_max_interval_s": 0.5},
            "metrics": {"bind": f"127.0.0.1:{metrics_port}"}, "preview": {"bind": None},
            "runtime": {"models_dir": str(models_dir), "instance": instance, "intra_op_threads": 1},
            "sinks": [{"kind": "mqtt", "url": mosquitto.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                      {"kind": "redis", "url": redis_server.url}]}


def _instances_seen(sub, want: set[str], timeout_s: float) -> dict[str, float]:
    """First arrival time of an event from each wanted instance."""
    seen: dict[str, float] = {}
    deadline_s = time.monotonic() + timeout_s
    while set(seen) != want and time.monotonic() < deadline_s:
        try:
            ev = sub.next(1.0)
        except TimeoutError:
            continue
        seen.setdefault(ev.instance, time.monotonic())
    return seen


def test_two_instances_reach_mqtt_and_redis_and_survive_a_broker_restart(models_dir, tmp_path, mosquitto,
                                                                           redis_server):
    redis = need_module("redis")
    metrics_ports = [free_port(), free_port()]
    preview_port = free_port()
    daemons = []
    for instance, port in zip(INSTANCES, metrics_ports):
        (tmp_path / instance).mkdir()
        cfg = _config(models_dir, instance, mosquitto, redis_server, port)
        if instance == "site-a":
            cfg["preview"] = {"bind": f"127.0.0.1:{preview_port}"}
        daemons.append(Daemon(tmp_path / instance, cfg))
    try:
        for d in daemons:
            d.wait_ready()
        # mosquitto's own client sees both instances on <prefix>/<instance>/<camera>/<type>
        out = subprocess.run([need_tool("mosquitto_sub"), "-p", str(mosquitto.port), "-v", "-t", "agecam/+/+/+",
                              "-W", "8"], capture_output=True, text=True, timeout=30).stdout.splitlines()
        topics = {line.split(" ", 1)[0] for line in out}
        for instance in INSTANCES:
            assert f"agecam/{instance}/door/camera.status" in topics, sorted(topics)[:10]
            assert any(t.startswith(f"agecam/{instance}/door/track.") for t in topics), sorted(topics)[:10]
        for line in out[:20]:
            topic, payload = line.split(" ", 1)
            ev = json.loads(payload)
            assert topic == f"agecam/{ev['instance']}/{ev['camera']}/{ev['type']}"
        # the client library too
        with subscribe(mosquitto.url, types=["track."]) as sub:
            assert set(_instances_seen(sub, set(INSTANCES), 20)) == set(INSTANCES)

        # when the broker dies for a few seconds while both daemons keep running
        mosquitto.kill()
        wait_for(lambda: all(b"agecam_sink_connected{sink=\"mqtt\"} 0.0" in http_get(
            f"http://127.0.0.1:{p}/metrics")[1] for p in metrics_ports), 20, "both mqtt sinks reported down")
        # /healthz says which sink is down and why, and calls the daemon degraded (the cameras are fine)
        code, body = http_get(f"http://127.0.0.1:{preview_port}/healthz")
        health = json.loads(body)
        assert code == 503 and health["status"] == "degraded", health
        assert health["sinks"]["mqtt"]["connected"] is False and health["sinks"]["mqtt"]["reason"], health["sinks"]
        assert health["sinks"]["redis"]["connected"] is True
        assert all(c["status"] == "online" for c in health["cameras"].values())
        time.sleep(3)
        assert all(d.proc.poll() is None for d in daemons)
        restarted_s = time.monotonic()
        mosquitto.start()
        # then events from both instances resume
        with subscribe(mosquitto.url, types=["track."]) as sub:
            seen = _instances_seen(sub, set(INSTANCES), 30)
        assert set(seen) == set(INSTANCES), seen
        resume_s = max(seen.values()) - restarted_s
        print(f"mqtt events from both instances {resume_s:.2f} s after the broker restarted")
        wait_for(lambda: all(b"agecam_sink_connected{sink=\"mqtt\"} 1.0" in http_get(
            f"http://127.0.0.1:{p}/metrics")[1] for p in metrics_ports), 20, "both mqtt sinks reported up")
        assert json.loads(http_get(f"http://127.0.0.1:{preview_port}/healthz")[1])["status"] == "ok"
        assert all(d.proc.poll() is None for d in daemons)
    finally:
        codes = [d.stop() for d in daemons]
    assert codes == [0, 0], [d.log()[-2000:] for d in daemons]

    # the Redis stream (up throughout) holds every event of both runs: seq 1..N per instance, no gap, no repeat
    r = redis.Redis(port=redis_server.port)
    entries = [json.loads(fields[b"event"]) for _id, fields in r.xrange("agecam:events")]
    r.close()
    for instance in INSTANCES:
        seqs = [e["seq"] for e in entries if e["instance"] == instance]
        assert len(seqs) > 20, (instance, len(seqs))
        assert seqs == list(range(1, len(seqs) + 1)), f"{instance}: gaps or repeats in {seqs[:50]}..."
        assert len({e["run_id"] for e in entries if e["instance"] == instance}) == 1
    for d in daemons:
        assert "sink mqtt" in d.log() and "stopped with" not in d.log()


def test_reload_keeps_unchanged_sinks_connected_and_secrets_stay_out(models_dir, tmp_path, mosquitto, redis_server,
                                                                      monkeypatch):
    redis = need_module("redis")
    canary = "canary-broker-pw-90417"
    monkeypatch.setenv("AGECAM_TEST_BROKER_PW", canary)  # inherited by the daemon
    metrics_port = free_port()
    cfg = _config(models_dir, "site-a", mosquitto, redis_server, metrics_port)
    cfg["sinks"][0]["url"] = f"mqtt://agecam:${{env:AGECAM_TEST_BROKER_PW}}@127.0.0.1:{mosquitto.port}"
    cfg["sinks"][1]["password"] = "${env:AGECAM_TEST_BROKER_PW}"
    (tmp_path / "d").mkdir()
    redis_server.cli("CONFIG", "SET", "requirepass", canary)
    d = Daemon(tmp_path / "d", cfg)
    r = redis.Redis(port=redis_server.port, password=canary)

    def clients() -> set[str]:
        return {c["id"] for c in r.client_list() if c["name"] != "" or c["cmd"] != "client|list"}

    def stream_len(name: str = "agecam:events") -> int:
        return r.xlen(name)

    try:
        d.wait_ready()
        wait_for(lambda: stream_len() > 5, 60, "events in the stream")
        before = clients()
        # when the config is reloaded three times with the sinks unchanged
        for i in range(3):
            n = d.log().count("reload applied")
            d.proc.send_signal(1)  # SIGHUP
            wait_for(lambda: d.log().count("reload applied") > n, 60, f"reload {i + 1} applied")
        grown = stream_len()
        wait_for(lambda: stream_len() > grown + 5, 60, "events after the reloads")
        # then the sink kept its connection (the same client) and the stream has no gap across the reloads
        assert clients() == before, (before, clients())
        seqs = [json.loads(f[b"event"])["seq"] for _id, f in r.xrange("agecam:events")]
        assert seqs == list(range(1, len(seqs) + 1))
        # when the sink's stream changes, a reload moves the events there
        cfg["sinks"][1]["stream"] = "agecam:moved"
        d.write_config(cfg)
        n = d.log().count("reload applied")
        d.proc.send_signal(1)
        wait_for(lambda: d.log().count("reload applied") > n, 60, "the stream change applied")
        wait_for(lambda: stream_len("agecam:moved") > 3, 60, "events in the new stream")
        metrics_text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1].decode()
        assert 'agecam_sink_connected{sink="redis"} 1.0' in metrics_text
    finally:
        code = d.stop()
        r.close()
    assert code == 0, d.log()[-3000:]
    # and the broker password appears nowhere: not in the log, the metrics, nor the events
    assert canary not in d.log() and canary not in metrics_text
    assert "sink mqtt: mqtt://***@127.0.0.1" in d.log()
