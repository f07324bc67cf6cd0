"""The systemd unit (verify, exposure score, its seccomp sandbox) and the sd_notify/watchdog code.

Run as a script, this file is also a sandbox launcher used by the end-to-end tests:
    python tests/test_systemd.py -- CMD ARGS...
execs CMD under the unit's SystemCallFilter=@system-service (EPERM for the rest) and MemoryDenyWriteExecute=yes,
built with libseccomp the same way systemd builds them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "agecam.service"
MAX_EXPOSURE = 1.5


# ---------------------------------------------------------------- sandbox (the unit's seccomp, reproduced)

def _unit_values(key: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"(?m)^{key}=(.*)$", UNIT.read_text())]


def syscall_set(spec: str, _seen: set[str] | None = None) -> set[str]:
    """Expand a systemd syscall group (e.g. '@system-service') to syscall names using systemd-analyze."""
    seen = set() if _seen is None else _seen
    if spec in seen:
        return set()
    seen.add(spec)
    out = subprocess.run(["systemd-analyze", "syscall-filter", spec], capture_output=True, text=True, check=True).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        names |= syscall_set(item, seen) if item.startswith("@") else {item}
    return names


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


_ACT_ALLOW = 0x7FFF0000
_CMP_MASKED_EQ = 7


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def apply_unit_sandbox() -> None:
    """Load the unit's syscall allow-list and MemoryDenyWriteExecute filters into this process (inherited by exec)."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    assert _unit_values("SystemCallErrorNumber") == ["EPERM"], "the sandbox reproduces SystemCallErrorNumber=EPERM"
    allowed: set[str] = set()
    denied: set[str] = set()
    for line in _unit_values("SystemCallFilter"):  # an allow-list, then `~` lines taking groups out of it
        into = denied if line.startswith("~") else allowed
        for spec in line.lstrip("~").split():
            into |= syscall_set(spec) if spec.startswith("@") else {spec}
    allowed -= denied
    if _unit_values("MemoryDenyWriteExecute") == ["yes"]:
        # first MemoryDenyWriteExecute, as systemd's seccomp_memory_deny_write_execute()
        ctx = lib.seccomp_init(_ACT_ALLOW)
        prot_write, prot_exec, shm_exec = 0x2, 0x4, 0o100000
        rules = (("mmap", prot_write | prot_exec), ("mprotect", prot_exec), ("pkey_mprotect", prot_exec),
                 ("shmat", shm_exec))
        for name, mask in rules:
            cmp = _ArgCmp(2, _CMP_MASKED_EQ, mask, mask)
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            assert lib.seccomp_rule_add_array(ctx, _act_errno(errno.EPERM), nr, 1, ctypes.byref(cmp)) == 0, name
        assert lib.seccomp_load(ctx) == 0, "loading the MemoryDenyWriteExecute filter failed"
    # then the allow-list, EPERM for the rest (SystemCallFilter= + SystemCallErrorNumber=); it forbids seccomp()
    # itself, so it is loaded last
    ctx = lib.seccomp_init(_act_errno(errno.EPERM))
    for name in sorted(allowed):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:  # names of other architectures resolve to an error
            assert lib.seccomp_rule_add_array(ctx, _ACT_ALLOW, nr, 0, None) == 0, f"cannot allow {name}"
    assert lib.seccomp_load(ctx) == 0, "loading the syscall allow-list failed"


def sandboxed(argv: list[str]) -> list[str]:
    """argv prefixed so it runs under apply_unit_sandbox()."""
    return [sys.executable, str(Path(__file__).resolve()), "--", *argv]


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "--" or len(args) < 2:
        sys.exit("usage: python tests/test_systemd.py -- CMD ARGS...")
    apply_unit_sandbox()
    os.execvp(args[1], args[1:])


# ---------------------------------------------------------------- tests

import pytest  # noqa: E402  (the launcher above must not need pytest)

from agecam.daemon.systemd import Notifier, WatchdogPinger  # noqa: E402

from tests.helpers import need_library, need_tool, wait_for  # noqa: E402


@pytest.fixture
def analyze() -> str:
    """systemd-analyze (Debian package systemd): required, so a missing one fails the tests that use it."""
    return need_tool("systemd-analyze")


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv (verify checks that the binary exists)."""
    text = UNIT.read_text()
    assert "ExecStart=/opt/agecam/.venv/bin/agecam run --config /etc/agecam/agecam.yaml" in text, \
        "the unit must run the documented install path"
    text = text.replace("/opt/agecam/.venv/bin/agecam", f"{sys.executable} -m agecam.cli")
    out = tmp_path / "agecam.service"
    out.write_text(text)
    return out


def test_unit_passes_systemd_analyze_verify(tmp_path, analyze):
    # given the unit, its ExecStart pointed at this venv
    unit = _unit_for_verify(tmp_path)
    # when systemd-analyze verifies it
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path)
    # then it passes without a single warning
    assert res.returncode == 0, f"verify failed: {res.stdout}{res.stderr}"
    assert not (res.stdout + res.stderr).strip(), f"verify printed warnings:\n{res.stdout}{res.stderr}"


def test_unit_exposure_is_at_most_one_and_a_half(tmp_path, analyze):
    # given the unit
    unit = _unit_for_verify(tmp_path)
    # when systemd-analyze scores it offline
    res = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, cwd=tmp_path)
    text = res.stdout + res.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", text)
    # then the score is 1.5 or lower and nothing about the unit was ignored
    assert m, f"no exposure line in:\n{text}"
    assert float(m.group(1)) <= MAX_EXPOSURE, f"exposure {m.group(1)} > {MAX_EXPOSURE}:\n{text}"
    assert "Unknown key" not in text and "ignoring" not in text, f"systemd ignored part of the unit:\n{text}"


@pytest.mark.parametrize("drop_in, applied_marker", [
    ("gpu.conf", "char-nvidia-frontend:rw"),
    ("static-user.conf", "static non-root user"),
])
def test_drop_in_verifies_and_stays_within_the_exposure_limit(tmp_path, drop_in, applied_marker, analyze):
    # given the unit with a drop-in from systemd/ beside it
    unit = _unit_for_verify(tmp_path)
    (tmp_path / "agecam.service.d").mkdir()
    shutil.copy(REPO / "systemd" / drop_in, tmp_path / "agecam.service.d" / drop_in)
    # when verified and scored
    verify = subprocess.run([analyze, "verify", unit.name], capture_output=True, text=True, cwd=tmp_path)
    sec = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", unit.name],
                         capture_output=True, text=True, cwd=tmp_path).stdout
    # then it is clean, the drop-in was applied, and the exposure is still 1.5 or lower
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    assert applied_marker in sec, f"{drop_in} not applied:\n{sec}"
    score = float(re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", sec).group(1))
    assert score <= MAX_EXPOSURE, f"exposure with {drop_in} is {score} > {MAX_EXPOSURE}"


TEMPLATE = REPO / "systemd" / "agecam@.service"
# what may differ between the two units: the instance's paths, names and its default runtime.instance
PER_INSTANCE_KEYS = ("Description", "ExecStart", "Environment", "StateDirectory", "CacheDirectory", "WorkingDirectory")


def _settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_template_unit_verifies_scores_like_the_main_unit_and_keeps_its_hardening(tmp_path, analyze):
    # given agecam@.service instantiated as agecam@door.service, ExecStart pointed at this venv
    text = TEMPLATE.read_text()
    assert "ExecStart=/opt/agecam/.venv/bin/agecam run --config /etc/agecam/%i.yaml" in text
    unit = tmp_path / "agecam@.service"
    unit.write_text(text.replace("/opt/agecam/.venv/bin/agecam", f"{sys.executable} -m agecam.cli"))
    # when verified and scored
    verify = subprocess.run([analyze, "verify", "agecam@door.service"], capture_output=True, text=True, cwd=tmp_path)
    sec = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", "agecam@door.service"],
                         capture_output=True, text=True, cwd=tmp_path)
    # then it is clean and as exposed as the main unit (or less)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    score = float(re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", sec.stdout + sec.stderr).group(1))
    assert score <= MAX_EXPOSURE, sec.stdout
    # and every other setting of agecam.service is in the template, unchanged (no hardening drifts apart)
    main = [line for line in _settings(UNIT.read_text()) if not line.startswith(PER_INSTANCE_KEYS)]
    missing = [line for line in main if line not in _settings(text)]
    assert not missing, f"agecam@.service lacks settings of agecam.service: {missing}"
    for line in ("StateDirectory=agecam/%i", "WorkingDirectory=/var/lib/agecam/%i", "Environment=AGECAM_INSTANCE=%H-%i",
                 "Environment=AGECAM_MODELS_DIR=/opt/agecam/models"):
        assert line in text.splitlines(), f"template lacks {line!r}"


def test_instance_defaults_to_agecam_instance_then_the_host_name(monkeypatch):
    from agecam.config import parse

    doc = {"cameras": [{"name": "door", "source": "demo"}]}
    monkeypatch.setenv("AGECAM_INSTANCE", "edge-7-door")
    assert parse(doc).runtime.instance == "edge-7-door"
    monkeypatch.setenv("AGECAM_INSTANCE", "bad/name with spaces")
    assert parse(doc).runtime.instance == "bad-name-with-spaces"
    monkeypatch.delenv("AGECAM_INSTANCE")
    import socket

    assert parse(doc).runtime.instance == socket.gethostname().replace("/", "-")[:64]


def test_unit_has_the_operational_settings():
    # given the unit's text, when read, then the service-manager contract is there
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure",
                 "ExecReload=/bin/kill -HUP $MAINPID", "DynamicUser=yes", "SupplementaryGroups=video",
                 "DeviceAllow=char-video4linux rw", "DevicePolicy=closed", "CapabilityBoundingSet=",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "Environment=AGECAM_MODELS_DIR=/var/lib/agecam/models",
                 "RestartPreventExitStatus=2", "StartLimitIntervalSec=0", "LimitNOFILE=4096", "TasksMax=512",
                 "MemoryHigh=1536M", "MemoryMax=2G", "SystemCallFilter=~@privileged"):
        assert re.search(rf"(?m)^{re.escape(line)}$", text), f"unit lacks {line!r}"


SANDBOX_PROBE = textwrap.dedent("""
    import errno, http.server, mmap, os, socket, threading, ctypes
    import numpy as np, cv2, onnx, onnxruntime as ort, zmq
    from onnx import helper, TensorProto
    # controls: what the unit forbids is refused here too
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("RWX-ALLOWED")
    except OSError as e:
        print("RWX-REFUSED", e.errno)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(103, 10, 0, 0)  # syslog(SIZE_BUFFER): not in @system-service
    print("SYSLOG", rc, ctypes.get_errno())
    # the daemon's real work: ONNX Runtime CPU inference, OpenCV JPEG + mp4v, ZeroMQ, HTTP
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], np.random.rand(8 * 27).astype(np.float32))
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
                           helper.make_node("GlobalAveragePool", ["r"], ["y"])], "g", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": np.random.rand(4, 3, 32, 32).astype(np.float32)})[0]
    print("ORT", out.shape)
    img = np.random.randint(0, 255, (120, 160, 3), np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    vw = cv2.VideoWriter(os.environ["PROBE_MP4"], cv2.VideoWriter_fourcc(*"mp4v"), 10, (160, 120))
    for _ in range(5): vw.write(img)
    vw.release()
    print("CV2", ok, os.path.getsize(os.environ["PROBE_MP4"]) > 0)
    ctx = zmq.Context(); pub = ctx.socket(zmq.PUB); port = pub.bind_to_random_port("tcp://127.0.0.1"); pub.close(); ctx.term()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler); srv.server_close()
    print("NET ok")
""")


def test_onnxruntime_and_opencv_work_under_the_units_seccomp_and_memory_deny_write_execute(tmp_path, analyze):
    need_library("seccomp")
    # given the unit's SystemCallFilter and MemoryDenyWriteExecute reproduced with libseccomp
    env = dict(os.environ, PROBE_MP4=str(tmp_path / "probe.mp4"))
    # when the daemon's kinds of work run under it
    res = subprocess.run(sandboxed([sys.executable, "-c", SANDBOX_PROBE]), capture_output=True, text=True,
                         env=env, timeout=120)
    out = res.stdout
    # then the controls show the filter bites, and inference, video and sockets still work
    assert res.returncode == 0, f"probe failed under the sandbox:\n{out}\n{res.stderr[-3000:]}"
    assert f"RWX-REFUSED {errno.EPERM}" in out, f"W+X mapping was not refused: the sandbox is not active\n{out}"
    assert f"SYSLOG -1 {errno.EPERM}" in out, f"a syscall outside @system-service was not refused\n{out}"
    assert "ORT (4, 8, 1, 1)" in out, f"onnxruntime inference failed under MemoryDenyWriteExecute\n{out}"
    assert "CV2 True True" in out and "NET ok" in out, f"OpenCV or sockets failed under the sandbox\n{out}"


# ---------------------------------------------------------------- sd_notify

@pytest.fixture
def notify_socket(tmp_path):
    """A real AF_UNIX datagram socket, as systemd's, and a reader of what arrives on it."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)

    def read_all(wait_s: float = 0.0) -> list[str]:
        msgs, deadline = [], time.monotonic() + wait_s
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msgs.append(sock.recv(4096).decode())
            except socket.timeout:
                return msgs

    yield path, sock, read_all
    sock.close()


def test_notifier_messages_arrive_on_a_real_socket(notify_socket):
    # given NOTIFY_SOCKET pointing at a datagram socket
    path, sock, read_all = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    # when each kind of message is sent
    assert n.ready("2 cameras online"), "ready() reported a failed send"
    n.status("lobby online\n12.5 fps")
    n.watchdog()
    n.reloading()
    n.stopping()
    got = read_all(0.3)
    n.close()
    # then each arrives, one datagram per call, STATUS on one line, RELOADING with a monotonic timestamp
    assert got[0] == "READY=1\nSTATUS=2 cameras online", f"unexpected READY datagram: {got!r}"
    assert got[1] == "STATUS=lobby online 12.5 fps", f"STATUS not folded to one line: {got[1]!r}"
    assert got[2] == "WATCHDOG=1", got
    fields = dict(line.split("=", 1) for line in got[3].splitlines())
    assert fields.get("RELOADING") == "1", got[3]
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now_usec - int(fields["MONOTONIC_USEC"]) < 5_000_000, f"MONOTONIC_USEC not current: {got[3]!r}"
    assert got[4] == "STOPPING=1" and len(got) == 5, got


def test_notifier_reaches_an_abstract_socket():
    # given an abstract-namespace socket, named with '@' as systemd does
    name = f"agecam-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        # when READY is sent
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        # then it arrives
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_notifier_without_socket_is_a_no_op():
    # given no NOTIFY_SOCKET, when messages are sent, then nothing is sent and nothing fails
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s is None
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False


@pytest.mark.parametrize("env, expected_s", [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_from_environment(env, expected_s):
    # given systemd's watchdog variables, when read, then the interval is in seconds or None
    env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    assert Notifier(env).watchdog_interval_s == expected_s, f"wrong interval for {env}"


def test_watchdog_pings_only_while_healthy(notify_socket, caplog):
    # given a pinger on a real notify socket and a health flag we control (stepped by hand: no clock involved)
    path, sock, read_all = notify_socket
    healthy = [True]
    pinger = WatchdogPinger(Notifier({"NOTIFY_SOCKET": path}),
                            lambda: (healthy[0], "pipeline:lobby stalled 12 s"), threading.Event(), interval_s=0.2)
    caplog.set_level(logging.INFO, logger="agecam.daemon.systemd")
    # when it ticks healthy, stalled, then recovered
    sent = []
    for state in (True, True, True, False, False, False, True, True):
        healthy[0] = state
        sent.append(pinger.tick())
    got = read_all(0.3)
    # then exactly the healthy ticks pinged, in order, and nothing else arrived
    assert sent == [True, True, True, False, False, False, True, True], f"pings per tick: {sent}"
    assert got == ["WATCHDOG=1"] * 5 and pinger.pings == 5, f"datagrams: {got!r}"
    messages = [r.getMessage() for r in caplog.records]
    withheld = [m for m in messages if "withholding" in m]
    assert len(withheld) == 1 and "stalled 12 s" in withheld[0], f"withholding should be logged once: {messages}"
    assert sum("resumed" in m for m in messages) == 1, f"the recovery should be logged once: {messages}"
    assert not pinger.withholding


def test_watchdog_thread_pings_repeatedly_at_half_the_interval(notify_socket):
    # given a started pinger thread with a 0.2 s watchdog (pings every 0.1 s)
    path, _, read_all = notify_socket
    stop = threading.Event()
    pinger = WatchdogPinger(Notifier({"NOTIFY_SOCKET": path}), lambda: True, stop, interval_s=0.2)
    assert pinger.period_s == pytest.approx(0.1), f"period {pinger.period_s} is not half the watchdog interval"
    assert pinger.start(), "pinger did not start although a watchdog interval was given"
    try:
        # when it runs, then pings keep coming (a real-time property: waited for, with a generous deadline)
        got: list[str] = []
        wait_for(lambda: got.extend(read_all(0.2)) or got.count("WATCHDOG=1") >= 3, 20, "3 pings from the thread")
    finally:
        stop.set()
        assert pinger.join(5.0), "watchdog thread did not stop"


def test_watchdog_treats_a_raising_health_check_as_unhealthy(notify_socket):
    # given a health check that raises
    path, _, read_all = notify_socket

    def broken() -> bool:
        raise RuntimeError("heartbeat table missing")

    pinger = WatchdogPinger(Notifier({"NOTIFY_SOCKET": path}), broken, threading.Event(), interval_s=0.1)
    # when it ticks, then no ping is sent and it is withholding
    assert [pinger.tick() for _ in range(3)] == [False] * 3
    assert pinger.withholding and pinger.pings == 0
    assert read_all(0.2) == [], "a raising health check must not ping the watchdog"


def test_watchdog_pinger_does_nothing_without_a_watchdog():
    # given no WATCHDOG_USEC, when started, then no thread runs
    assert WatchdogPinger(Notifier({}), lambda: True, threading.Event()).start() is False


# ---------------------------------------------------------------- logs for journald

def _log_through(fmt: str, stream, *records: tuple[int, str, tuple]) -> None:
    from agecam.logs import setup_logging

    handler = setup_logging("DEBUG", fmt, stream)
    log = logging.getLogger("agecam.test")
    try:
        for level, msg, args in records:
            log.log(level, msg, *args, exc_info=level >= logging.ERROR and sys.exc_info()[0] is not None)
    finally:
        logging.getLogger().removeHandler(handler)


def test_journal_format_has_priorities_and_no_timestamp(tmp_path, monkeypatch):
    # given stderr connected to the journal (JOURNAL_STREAM names the stream's device:inode)
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        # when lines of several levels are logged
        _log_through("text", stream, (logging.ERROR, "camera %s offline", ("lobby",)),
                     (logging.INFO, "two\nlines", ()), (logging.DEBUG, "detail", ()))
    lines = path.read_text().splitlines()
    # then each carries its syslog priority and no timestamp (journald adds its own)
    assert lines[0] == "<3>agecam.test [MainThread] camera lobby offline", lines
    assert lines[1:3] == ["<6>agecam.test [MainThread] two", "<6>lines"], lines
    assert lines[3].startswith("<7>"), lines
    assert not re.search(r"\d{4}-\d\d-\d\d", path.read_text()), "journal lines should not repeat the time"


def test_json_lines_are_one_object_per_record_and_secrets_are_scrubbed(tmp_path):
    # given the JSON format, a registered secret and an RTSP URL with a password
    from agecam.logs import add_secret

    add_secret("preview-token-xyz")
    path = tmp_path / "log.jsonl"
    with open(path, "w") as stream:
        # when lines carrying them are logged, one with an exception
        _log_through("json", stream,
                     (logging.WARNING, "reconnecting %s", ("rtsp://admin:hunter2@10.1.2.3/stream?token=abc",)),
                     (logging.INFO, "viewer used %s", ("preview-token-xyz",)))
        try:
            raise ValueError("open rtsp://u:pw@cam/x failed")
        except ValueError:
            _log_through("json", stream, (logging.ERROR, "capture crashed", ()))
    import json
    objs = [json.loads(line) for line in path.read_text().splitlines()]
    # then each line is an object with the fields, and no secret survives anywhere
    assert [o["level"] for o in objs] == ["WARNING", "INFO", "ERROR"], objs
    assert objs[0]["msg"] == "reconnecting rtsp://***@10.1.2.3/stream?token=***", objs[0]
    assert objs[1]["msg"] == "viewer used ***", objs[1]
    assert "rtsp://***@cam/x" in objs[2]["exc"], objs[2]
    text = path.read_text()
    for secret in ("hunter2", "abc", "preview-token-xyz", "pw@"):
        assert secret not in text, f"{secret!r} leaked into the log"
