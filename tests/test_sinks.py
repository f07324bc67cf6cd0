"""Sinks and the client library against real brokers (mosquitto, redis-server), plus the backlog's logic."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from agecam.client import Event, EventError, subscribe
from agecam.config import ConfigError, parse
from agecam.daemon.metrics import Metrics
from agecam.daemon.sink_mqtt import MqttSink
from agecam.daemon.sink_redis import RedisSink
from agecam.daemon.sinks import Backlog
from agecam.events import AgeEstimate, EventFactory
from agecam.sinkconfig import MqttSinkConfig, RedisSinkConfig
from tests.helpers import agecam_cmd, need_module, need_tool, wait_for


def _status(f: EventFactory, camera: str = "door", status: str = "online") -> tuple[dict, bytes]:
    ev = f.camera_status(camera, time.time(), status, "")
    return ev, json.dumps(ev).encode()


def _track(f: EventFactory, track_id: int, camera: str = "door") -> tuple[dict, bytes]:
    age = AgeEstimate(41.5, 3.0, 36.6, 46.4, 4, False)
    ev = f.track("track.update", camera, time.time(), track_id, (10, 20, 110, 140), 0.98, age, 1.0, 2.0)
    return ev, json.dumps(ev).encode()


def _sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels)


# -- the backlog ----------------------------------------------------------------------------------------------------
def test_backlog_keeps_the_newest_and_counts_what_it_dropped():
    b = Backlog(3)
    assert [b.put(i) for i in range(5)] == [0, 0, 0, 1, 1]
    first, items = b.head(10)
    assert (first, items) == (2, [2, 3, 4])


def test_backlog_removes_only_what_was_delivered_even_after_drops_meanwhile():
    # given a sender that took items 0..2 from the head
    b = Backlog(3)
    for i in range(3):
        b.put(i)
    first, batch = b.head(3)
    # when, while it delivers them, two newer events push 0 and 1 out, and it then removes what it delivered
    b.put(3)
    b.put(4)
    b.remove_before(first + len(batch))
    # then exactly the undelivered newer ones remain
    assert b.head(10) == (3, [3, 4])


# -- config ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sinks, error", [
    ([{"kind": "kafka", "url": "x"}], "sinks[0].kind: must be one of 'mqtt', 'redis' (got 'kafka')"),
    ([{"url": "mqtt://h"}], "sinks[0].kind: must be one of 'mqtt', 'redis'"),
    ([{"kind": "mqtt", "url": "http://h"}], "sinks[0].url: expected mqtt:// or mqtts://HOST[:PORT]"),
    ([{"kind": "mqtt", "url": "mqtt://h", "qos": 2}], "sinks[0].qos: must be one of 0 or 1 (got 2)"),
    ([{"kind": "mqtt", "url": "mqtt://h", "topic_prefix": "a/#"}], "sinks[0].topic_prefix: String should match"),
    ([{"kind": "redis", "url": "redis://h:0"}], "sinks[0].url: port must be 1-65535"),
    ([{"kind": "redis", "url": "redis://h", "backlog": 0}], "sinks[0].backlog: Input should be greater than or equal to 1"),
    ([{"kind": "redis", "url": "redis://a"}, {"kind": "redis", "url": "redis://b"}],
     "sinks[1].name: 'redis' is already used by sinks[0]"),
    ([{"kind": "redis", "url": "redis://h", "sream": "x"}], "sinks[0].sream: unknown field"),
])
def test_bad_sink_config_names_the_field(sinks, error):
    with pytest.raises(ConfigError) as exc:
        parse({"cameras": [{"name": "door", "source": "demo"}], "sinks": sinks})
    assert any(e.startswith(error) for e in exc.value.errors), exc.value.errors


def test_sink_passwords_are_secrets_and_instance_names_are_topic_safe(monkeypatch):

    monkeypatch.setenv("BROKER_PW", "canary-broker-pw-7731")
    cfg = parse({"cameras": [{"name": "door", "source": "demo"}],
                 "sinks": [{"kind": "mqtt", "url": "mqtt://u:url-pw-5512@h", "password": "${env:BROKER_PW}"}]})
    assert {"canary-broker-pw-7731", "url-pw-5512"} <= set(cfg.secrets())
    with pytest.raises(ConfigError) as exc:
        parse({"cameras": [{"name": "door", "source": "demo"}], "runtime": {"instance": "a/b"}})
    assert exc.value.errors[0].startswith("runtime.instance: String should match pattern")


# -- the event type -------------------------------------------------------------------------------------------------
def test_client_event_parses_what_the_daemon_builds_and_names_bad_fields():
    jsonschema = need_module("jsonschema")
    from agecam.events import event_schema

    f = EventFactory(instance="site-a")
    for ev, payload in (_status(f), _track(f, 7)):
        jsonschema.validate(ev, event_schema())
        parsed = Event.from_json(payload)
        assert (parsed.instance, parsed.camera, parsed.seq, parsed.type) == ("site-a", "door", ev["seq"], ev["type"])
    parsed = Event.from_json(_track(f, 7)[1])
    assert parsed.track_id == 7 and parsed.box_xyxy == (10, 20, 110, 140) and parsed.age.years == 41.5
    bad = dict(_track(f, 8)[0])
    for field, value, message in (("seq", "3", "seq: expected int"), ("box_xyxy", [1, 2, 3], "box_xyxy: expected 4"),
                                  ("type", "track.moved", "type: must be one of"), ("camera", None, "camera: missing")):
        with pytest.raises(EventError, match=message):
            Event.from_json({**bad, field: value})
    with pytest.raises(EventError, match="age.years: expected number"):
        Event.from_json({**bad, "age": {**bad["age"], "years": "old"}})
    with pytest.raises(ValueError, match="expected one of tcp://"):
        subscribe("kafka://h:9092")


# -- MQTT -----------------------------------------------------------------------------------------------------------
def test_mqtt_sink_publishes_on_the_documented_topics_with_camera_status_retained(mosquitto, tmp_path):
    metrics = Metrics()
    metrics.add_sinks(["mqtt"])
    sink = MqttSink(MqttSinkConfig(kind="mqtt", url=mosquitto.url, topic_prefix="shop"), "site-a", metrics)
    sink.start()
    try:
        wait_for(lambda: sink.connected, 10, "the mqtt sink to connect")
        f = EventFactory(instance="site-a")
        sink.submit(*_status(f, "door", "offline"))
        sink.submit(*_track(f, 3))
        wait_for(lambda: sink.sent == 2, 10, "two events acknowledged")
        # a subscriber arriving later gets the retained camera.status and the retained instance status
        out = subprocess.run([need_tool("mosquitto_sub"), "-p", str(mosquitto.port), "-v", "-t", "shop/#",
                              "-W", "2"], capture_output=True, text=True, timeout=20).stdout.splitlines()
        topics = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out}
        assert topics["shop/site-a/status"] == "online"
        assert json.loads(topics["shop/site-a/door/camera.status"])["status"] == "offline"
        assert "shop/site-a/door/track.update" not in topics  # track events are not retained
        assert _sample(metrics, "agecam_sink_events_sent_total", sink="mqtt") == 2
        assert _sample(metrics, "agecam_sink_connected", sink="mqtt") == 1
    finally:
        assert sink.close(3)
    # a clean stop says offline itself
    out = subprocess.run([need_tool("mosquitto_sub"), "-p", str(mosquitto.port), "-v", "-t", "shop/site-a/status",
                          "-C", "1", "-W", "5"], capture_output=True, text=True, timeout=20).stdout
    assert out.strip() == "shop/site-a/status offline"


@pytest.mark.slow  # broker and reader kills with waits: seconds each
def test_mqtt_sink_survives_broker_restarts_without_losing_queued_events_or_fds(mosquitto):
    # a fixed 2 s retry: a subscriber on the restarted broker is subscribed before the sink is back
    sink = MqttSink(MqttSinkConfig(kind="mqtt", url=mosquitto.url, reconnect_min_s=2, reconnect_max_s=2), "site-a")
    sink.start()
    f = EventFactory(instance="site-a")
    try:
        wait_for(lambda: sink.connected, 10, "the mqtt sink to connect")
        fds_before = len(os.listdir("/proc/self/fd"))
        for round_ in range(3):
            mosquitto.kill()
            wait_for(lambda: not sink.connected, 10, "the sink to notice the broker is gone")
            for i in range(20):
                sink.submit(*_track(f, round_ * 100 + i))
            assert len(sink.backlog) == 20  # held while the broker is away
            # a subscriber on the restarted broker receives every event queued during the outage
            mosquitto.start()
            with subscribe(mosquitto.url, timeout_s=15) as sub:
                got = [sub.next(15).track_id for _ in range(20)]
                assert sub.subscribed_s < sink.snapshot().since_s  # the order the test relies on
            assert got == [round_ * 100 + i for i in range(20)]
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2  # reconnects do not pile up sockets
    finally:
        sink.close(3)


# -- Redis ----------------------------------------------------------------------------------------------------------
def _stream_seqs(redis_server, stream: str = "agecam:events") -> list[int]:
    redis = need_module("redis")
    r = redis.Redis(port=redis_server.port)
    seqs = [json.loads(fields[b"event"])["seq"] for _id, fields in r.xrange(stream)]
    r.close()
    return seqs


def test_redis_sink_keeps_a_bounded_backlog_while_redis_is_down(redis_server):
    metrics = Metrics()
    metrics.add_sinks(["redis"])
    sink = RedisSink(RedisSinkConfig(kind="redis", url=redis_server.url, backlog=50, reconnect_min_s=0.2,
                                     reconnect_max_s=0.5), metrics)
    sink.start()
    f = EventFactory(instance="site-a")
    try:
        wait_for(lambda: sink.connected, 10, "the redis sink to connect")
        redis_server.kill()
        sink.submit(*_status(f))  # noticed on this delivery
        wait_for(lambda: not sink.connected, 10, "the sink to notice redis is gone")
        for i in range(80):
            sink.submit(*_track(f, i + 1))
        # then the backlog is bounded: the oldest 31 (the status event and tracks 1..30) are dropped and counted
        assert len(sink.backlog) == 50
        assert _sample(metrics, "agecam_sink_events_dropped_total", sink="redis", reason="backlog_full") == 31
        assert _sample(metrics, "agecam_sink_backlog_events", sink="redis") == 50
        assert _sample(metrics, "agecam_sink_connected", sink="redis") == 0
        health = sink.snapshot().as_dict()
        assert not health["connected"] and "Connection refused" in health["reason"]
        # when redis returns (empty: it saves nothing), the 50 newest arrive in order
        redis_server.start()
        wait_for(lambda: len(_stream_seqs(redis_server)) == 50, 15, "the backlog delivered")
        assert _stream_seqs(redis_server) == list(range(32, 82))
        assert _sample(metrics, "agecam_sink_events_sent_total", sink="redis") == 50
    finally:
        assert sink.close(3)


@pytest.mark.slow  # broker and reader kills with waits: seconds each
def test_consumer_group_reader_killed_and_restarted_loses_nothing_and_repeats_nothing_acknowledged(redis_server):
    sink = RedisSink(RedisSinkConfig(kind="redis", url=redis_server.url))
    sink.start()
    f = EventFactory(instance="site-a")
    total = 300

    def produce():
        for i in range(total):
            sink.submit(*_track(f, i + 1))
            time.sleep(0.01)

    reader = agecam_cmd() + ["events", "--connect", redis_server.url, "--group", "dash", "--consumer", "c1"]
    try:
        wait_for(lambda: sink.connected, 10, "the redis sink to connect")
        producer = threading.Thread(target=produce)
        producer.start()
        # a reader that prints a while and is then killed without warning
        first = subprocess.Popen(reader, stdout=subprocess.PIPE, text=True)
        printed_first = []
        while len(printed_first) < 60:
            line = first.stdout.readline()
            assert line, "the first reader ended early"
            printed_first.append(json.loads(line)["seq"])
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        printed_first += [json.loads(line)["seq"] for line in first.stdout.read().splitlines()]
        producer.join()
        # a restarted reader with the same group and consumer reads on until the stream is quiet
        second = subprocess.run(reader + ["--timeout", "3"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 3, second.stderr  # ended by --timeout
        printed_second = [json.loads(line)["seq"] for line in second.stdout.splitlines()]
        # then nothing is lost, and the only event seen twice is the one handed out last before the kill
        assert sorted(set(printed_first + printed_second)) == list(range(1, total + 1))
        repeated = set(printed_first) & set(printed_second)
        assert repeated <= {printed_first[-1]}, (repeated, printed_first[-1])
        assert printed_second == sorted(printed_second)
    finally:
        sink.close(3)


def test_consumer_group_claims_what_a_dead_consumer_left_and_a_failed_handler_is_not_acknowledged(redis_server):
    redis = need_module("redis")
    r = redis.Redis(port=redis_server.port)
    f = EventFactory(instance="site-a")
    for i in range(3):
        r.xadd("agecam:events", {"event": _track(f, i + 1)[1]})
    # given a consumer (a container whose host name changed since) that was handed an event and died
    gone = subscribe(redis_server.url, group="dash", consumer="pod-old", timeout_s=5)
    assert gone.next(5).seq == 1
    # when a consumer under a new name starts, claiming entries idle for a moment
    with subscribe(redis_server.url, group="dash", consumer="pod-new", claim_idle_s=0.0, timeout_s=5) as sub:
        got = [sub.next(5).seq for _ in range(3)]
    # then it gets the dead consumer's entry too, and nothing is stranded
    assert sorted(got) == [1, 2, 3]
    assert r.xpending("agecam:events", "dash")["pending"] == 0
    # and an event whose handler raised inside `with` stays pending, for the next start to get again
    r.xadd("agecam:events", {"event": _track(f, 4)[1]})
    with pytest.raises(RuntimeError):
        with subscribe(redis_server.url, group="dash", consumer="pod-new", timeout_s=5) as sub:
            for ev in sub:
                raise RuntimeError(f"handler failed on {ev.seq}")
    with subscribe(redis_server.url, group="dash", consumer="pod-new", timeout_s=5) as sub:
        assert sub.next(5).seq == 4
    gone.close(ack_last=False)
    r.close()


@pytest.mark.parametrize("kind", ["mqtt", "redis"])
def test_sink_stops_within_its_deadline_when_the_broker_freezes(kind, mosquitto, redis_server):
    broker = mosquitto if kind == "mqtt" else redis_server
    sink = (MqttSink(MqttSinkConfig(kind="mqtt", url=broker.url), "site-a") if kind == "mqtt"
            else RedisSink(RedisSinkConfig(kind="redis", url=broker.url)))
    sink.start()
    f = EventFactory(instance="site-a")
    try:
        wait_for(lambda: sink.connected, 10, "the sink to connect")
        # given a broker that stops answering (SIGSTOP) while events wait
        broker.proc.send_signal(signal.SIGSTOP)
        for i in range(10):
            sink.submit(*_track(f, i + 1))
        time.sleep(0.3)  # the sink is now blocked on the frozen broker
        # when the sink is closed with 2 s
        t0 = time.monotonic()
        stopped = sink.close(2.0)
        took = time.monotonic() - t0
        # then its thread has ended within them, the events still in its backlog
        assert stopped and took < 2.5, took
        assert len(sink.backlog) == 10
    finally:
        broker.proc.send_signal(signal.SIGCONT)


def test_an_event_the_broker_always_refuses_is_dropped_after_a_few_tries_without_hammering(tmp_path):
    from tests.brokers import Mosquitto

    # given a broker that disconnects any client sending a packet over 300 bytes
    class Small(Mosquitto):
        def _cmd(self):
            cmd = super()._cmd()
            conf = self.tmp / f"mosquitto-{self.port}.conf"
            conf.write_text(conf.read_text() + "max_packet_size 300\n")
            return cmd

    broker = Small(tmp_path)
    metrics = Metrics()
    sink = MqttSink(MqttSinkConfig(kind="mqtt", url=broker.url, reconnect_min_s=0.1, reconnect_max_s=0.4),
                    "site-a", metrics)
    connects = []
    real_connect = sink._connect
    sink._connect = lambda: (connects.append(time.monotonic()), real_connect())[1]
    sink.start()
    f = EventFactory(instance="site-a")
    try:
        wait_for(lambda: sink.connected, 10, "the sink to connect")
        big = f.camera_status("door", time.time(), "offline", "x" * 400)
        sink.submit(big, json.dumps(big).encode())
        sink.submit(*_status(f, "door", "online"))
        # then the oversized event is dropped as rejected after 5 tries, and the next one is delivered
        wait_for(lambda: sink.sent == 1, 20, "the event after the refused one delivered")
        assert _sample(metrics, "agecam_sink_events_dropped_total", sink="mqtt", reason="rejected") == 1
        # and the retries backed off: a handful of connections, not thousands
        assert 5 <= len(connects) <= 8, len(connects)
    finally:
        sink.close(2)
        broker.stop()


def test_redis_out_of_memory_keeps_the_events_until_it_accepts_writes(redis_server):
    sink = RedisSink(RedisSinkConfig(kind="redis", url=redis_server.url, reconnect_min_s=0.1, reconnect_max_s=0.3))
    sink.start()
    f = EventFactory(instance="site-a")
    try:
        wait_for(lambda: sink.connected, 10, "the sink to connect")
        # given Redis refusing writes (its memory limit reached)
        redis_server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
        redis_server.cli("CONFIG", "SET", "maxmemory", "1")
        for i in range(20):
            sink.submit(*_track(f, i + 1))
        # then nothing is dropped: the events wait, and health says why
        wait_for(lambda: "maxmemory" in sink.snapshot().reason, 10, "the sink to report the refusal")
        time.sleep(2)  # several retries (more than the poison limit) pass
        assert sink.dropped == 0 and len(sink.backlog) == 20
        # when Redis accepts writes again, every event arrives in order
        redis_server.cli("CONFIG", "SET", "maxmemory", "0")
        wait_for(lambda: len(_stream_seqs(redis_server)) == 20, 15, "the held events delivered")
        assert _stream_seqs(redis_server) == list(range(1, 21))
    finally:
        sink.close(2)


def test_events_command_reads_a_broker_password_from_the_environment(redis_server):
    # given a Redis that needs a password, and an event in the stream
    redis_server.cli("CONFIG", "SET", "requirepass", "canary-cli-pw-3318")
    redis = need_module("redis")
    r = redis.Redis(port=redis_server.port, password="canary-cli-pw-3318")
    r.xadd("agecam:events", {"event": _status(EventFactory(instance="site-a"))[1]})
    r.close()
    cmd = agecam_cmd() + ["events", "--connect", redis_server.url, "--group", "cli", "--count", "1", "--timeout", "10",
                          "--password-env", "BROKER_PW"]
    # when `agecam events` gets it from --password-env (never on its command line)
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, BROKER_PW="canary-cli-pw-3318"))
    unset = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    # then it reads the event; without the variable it refuses, naming it
    assert ok.returncode == 0 and json.loads(ok.stdout)["instance"] == "site-a", ok.stderr
    assert unset.returncode == 2 and "BROKER_PW is not set" in unset.stderr


@pytest.mark.slow  # six broker restarts
def test_outages_while_idle_blame_no_event(mosquitto):
    sink = MqttSink(MqttSinkConfig(kind="mqtt", url=mosquitto.url, reconnect_min_s=0.1, reconnect_max_s=2), "site-a")
    sink.start()
    f = EventFactory(instance="site-a")
    try:
        wait_for(lambda: sink.connected, 10, "the sink to connect")
        sink.submit(*_status(f))
        wait_for(lambda: sink.sent == 1, 10, "the first event delivered")
        # given more broker restarts than the poison limit, each noticed while the sink has nothing to send
        for _ in range(6):
            mosquitto.kill()
            wait_for(lambda: not sink.connected, 10, "the sink to notice")
            mosquitto.start()
            wait_for(lambda: sink.connected, 10, "the sink back")
        # when an event comes now, it is delivered: no outage counted against it
        sink.submit(*_status(f, "door", "offline"))
        wait_for(lambda: sink.sent == 2, 10, "the event after the outages delivered")
        assert sink.rejected == 0
    finally:
        sink.close(2)
