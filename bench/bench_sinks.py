"""Sinks on this machine: events per second each sustains into a real local broker (beside the ZeroMQ publisher in
the same run), the backlog's memory at its bound, and the time to resume after a broker restart.

    python bench/bench_sinks.py [--events 20000] [--backlog 10000] [--outages 3,15]

Needs Debian's mosquitto and redis-server (make test installs them). Prints one table per measure.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agecam.config import EventsConfig  # noqa: E402
from agecam.daemon.publish import Publisher  # noqa: E402
from agecam.daemon.sink_mqtt import MqttSink  # noqa: E402
from agecam.daemon.sink_redis import RedisSink  # noqa: E402
from agecam.events import AgeEstimate, EventFactory  # noqa: E402
from agecam.sinkconfig import MqttSinkConfig, RedisSinkConfig  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """mosquitto or redis-server on a free loopback port; start() again after kill() reuses the port."""

    def __init__(self, kind: str, tmp: Path):
        self.kind, self.tmp, self.port, self.proc = kind, tmp, free_port(), None
        self.start()

    def start(self) -> None:
        if self.kind == "mqtt":
            conf = self.tmp / f"m{self.port}.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
            cmd = [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]
        else:
            cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.tmp)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not listening(self.port):
            time.sleep(0.01)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        while listening(self.port):
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}" if self.kind == "mqtt" else f"redis://127.0.0.1:{self.port}/0"


def event(f: EventFactory, i: int) -> tuple[dict, bytes]:
    ev = f.track("track.update", "door", time.time(), i, (412, 96, 508, 220), 0.93,
                 AgeEstimate(34.2, 3.1, 29.0, 39.5, 12, True), time.time() - 5, time.time())
    return ev, json.dumps(ev, separators=(",", ":")).encode()


def make_sink(kind: str, url: str, **kw):
    if kind.startswith("mqtt"):
        return MqttSink(MqttSinkConfig(kind="mqtt", url=url, qos=int(kind[-1]), **kw), "bench")
    return RedisSink(RedisSinkConfig(kind="redis", url=url, **kw))


def throughput(kind: str, broker: Broker, n: int) -> float:
    sink = make_sink(kind, broker.url, backlog=n)
    sink.start()
    while not sink.connected:
        time.sleep(0.01)
    f = EventFactory(instance="bench")
    items = [event(f, i) for i in range(n)]
    t0 = time.perf_counter()
    for ev, payload in items:
        sink.submit(ev, payload)
    while sink.sent < n:
        time.sleep(0.002)
    rate = n / (time.perf_counter() - t0)
    sink.close(3)
    return rate


def zmq_throughput(n: int) -> float:
    pub = Publisher(EventsConfig(bind=f"tcp://127.0.0.1:{free_port()}", queue_size=n))
    pub.start()
    f = EventFactory(instance="bench")
    items = [event(f, i)[0] for i in range(n)]
    t0 = time.perf_counter()
    for ev in items:
        pub.submit(ev)
    while not pub._queue.empty():
        time.sleep(0.002)
    rate = n / (time.perf_counter() - t0)
    pub.close(2, linger_s=0)
    return rate


def backlog_bytes(kind: str, n: int) -> float:
    """Memory held by a full backlog of n events (sink pointed at a closed port, so nothing drains)."""
    sink = make_sink(kind, f"{'mqtt' if kind.startswith('mqtt') else 'redis'}://127.0.0.1:{free_port()}",
                     backlog=n, reconnect_min_s=60, reconnect_max_s=60)
    f = EventFactory(instance="bench")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):  # the event dict is dropped after submit, as in the daemon: what stays is the backlog's
        sink.submit(*event(f, i))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held


def resume_s(kind: str, broker: Broker, outage_s: float) -> float:
    """Seconds from the restarted broker listening to the first event delivered after an outage (default backoff)."""
    sink = make_sink(kind, broker.url)
    sink.start()
    while not sink.connected:
        time.sleep(0.01)
    f = EventFactory(instance="bench")
    broker.kill()
    sink.submit(*event(f, 0))
    deadline = time.monotonic() + outage_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
    sent = sink.sent
    broker.start()
    t0 = time.monotonic()
    while sink.sent == sent:
        time.sleep(0.005)
    took = time.monotonic() - t0
    sink.close(3)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--backlog", type=int, default=10000, help="backlog size to measure (the default config's)")
    ap.add_argument("--outages", default="3,15", help="outage lengths in seconds for the resume measure")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agecam-bench-sinks-"))
    brokers = {"mqtt": Broker("mqtt", tmp), "redis": Broker("redis", tmp)}
    kinds = ("mqtt-qos0", "mqtt-qos1", "redis")
    try:
        print(f"events per second, {args.events} track.update events (~{len(event(EventFactory(), 1)[1])} bytes):")
        print(f"  {'zeromq publisher (baseline)':28s} {zmq_throughput(args.events):10.0f}")
        for kind in kinds:
            broker = brokers["redis" if kind == "redis" else "mqtt"]
            print(f"  {kind + ' sink':28s} {throughput(kind, broker, args.events):10.0f}")
        print(f"backlog memory at its bound ({args.backlog} events):")
        for kind in ("mqtt-qos1", "redis"):
            held = backlog_bytes(kind, args.backlog)
            print(f"  {kind + ' sink':28s} {held / 1e6:8.2f} MB ({held / args.backlog:.0f} bytes/event)")
        print("first event delivered after the broker listens again (default backoff 0.5 s doubling to 10 s):")
        for outage in (float(x) for x in args.outages.split(",")):
            for kind in ("mqtt-qos1", "redis"):
                broker = brokers["redis" if kind == "redis" else "mqtt"]
                print(f"  {kind + ' sink':18s} outage {outage:5.1f} s: {resume_s(kind, broker, outage):6.2f} s")
    finally:
        for b in brokers.values():
            b.proc.kill()


if __name__ == "__main__":
    main()
