"""CURVE on the event bus, with real ZeroMQ sockets: only allow-listed subscribers receive, encrypted."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import zmq

from agecam.config import CurveConfig, EventsConfig
from agecam.daemon.publish import Publisher
from agecam.events import EventFactory
from agecam.keys import CertificateError, generate, load_public, load_secret
from tests.helpers import free_port


@pytest.fixture
def keys(tmp_path):
    """server pair, an allowed client pair (its public key in the allow-list) and a stranger's pair."""
    generate(tmp_path / "server", "server")
    generate(tmp_path / "clients", "alice")
    generate(tmp_path / "strangers", "mallory")
    allow = tmp_path / "authorized"
    allow.mkdir()
    shutil.copy(tmp_path / "clients" / "alice.key", allow / "alice.key")
    return tmp_path


def _subscriber(endpoint: str, server_pub: bytes | None = None, client_secret_file=None) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    if server_pub is not None:
        s.curve_serverkey = server_pub
        s.curve_publickey, s.curve_secretkey = load_secret(client_secret_file, "test client")
    s.setsockopt_string(zmq.SUBSCRIBE, "")
    s.connect(endpoint)
    return s


def _received(socks: dict[str, zmq.Socket], until) -> dict[str, list[dict]]:
    """Events each socket receives, polled together until until(got) is true (or 30 s)."""
    got = {name: [] for name in socks}
    poller = zmq.Poller()
    for s in socks.values():
        poller.register(s, zmq.POLLIN)
    deadline = time.monotonic() + 30
    while not until(got) and time.monotonic() < deadline:
        for s, _ in poller.poll(50):
            name = next(n for n, x in socks.items() if x is s)
            got[name].append(json.loads(s.recv_multipart()[1]))
    return got


def test_generated_secret_key_is_private_and_pairs_load(keys):
    secret = keys / "server" / "server.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600, oct(secret.stat().st_mode)
    public, _ = load_secret(secret, "test")
    assert load_public(keys / "server" / "server.key", "test") == public
    with pytest.raises(CertificateError, match="only a public key"):
        load_secret(keys / "server" / "server.key", "events.curve.server_secret_key")
    with pytest.raises(FileExistsError):
        generate(keys / "server", "server")


def test_only_the_listed_key_receives_events(keys):
    # given a CURVE publisher whose allow-list holds alice's public key
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = EventsConfig(bind=endpoint, curve=CurveConfig(server_secret_key=keys / "server" / "server.key_secret",
                                                        authorized_clients=keys / "authorized"))
    stop = threading.Event()
    pub = Publisher(cfg)
    pub.start()
    server_pub = load_public(keys / "server" / "server.key", "test")
    alice = _subscriber(endpoint, server_pub, keys / "clients" / "alice.key_secret")
    mallory = _subscriber(endpoint, server_pub, keys / "strangers" / "mallory.key_secret")
    plain = _subscriber(endpoint)
    factory = EventFactory()
    try:
        # when events are published for a while (subscriptions need a moment to arrive)
        def publish():
            while not stop.is_set():
                pub.submit(factory.camera_status("lobby", time.time(), "online", ""))
                stop.wait(0.05)

        threading.Thread(target=publish, daemon=True).start()
        got = _received({"alice": alice, "mallory": mallory, "plain": plain}, lambda g: len(g["alice"]) >= 20)
        # then alice receives them, and in the same second an unlisted key and a plain subscriber receive nothing
        assert len(got["alice"]) >= 20 and got["alice"][0]["schema"] == "agecam.event/v1", got["alice"][:2]
        assert got["mallory"] == [] and got["plain"] == [], {k: len(v) for k, v in got.items()}
    finally:
        stop.set()
        pub.close(2.0)
        for s in (alice, mallory, plain):
            s.close(0)


@pytest.mark.parametrize("which, expected", [
    ("server_secret_key", "expected a secret certificate file"),
    ("authorized_clients", "expected a folder of subscribers' public certificates"),
])
def test_missing_key_files_are_refused_at_start(keys, which, expected):
    paths = {"server_secret_key": keys / "server" / "server.key_secret", "authorized_clients": keys / "authorized"}
    paths[which] = keys / "nothing-here"
    cfg = EventsConfig(bind=f"tcp://127.0.0.1:{free_port()}", curve=CurveConfig(**paths))
    with pytest.raises(FileNotFoundError, match=expected):
        Publisher(cfg)


def test_off_loopback_bind_is_accepted_with_curve(keys):
    cfg = EventsConfig(bind="tcp://0.0.0.0:5556", curve=CurveConfig(
        server_secret_key=keys / "server" / "server.key_secret", authorized_clients=keys / "authorized"))
    assert cfg.curve is not None
