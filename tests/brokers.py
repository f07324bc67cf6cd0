"""Real brokers for the sink tests: Debian's mosquitto and redis-server on loopback, on free ports."""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port, need_tool, wait_for


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class _Server:
    """A broker process that can be killed and started again on the same port."""

    name = "server"

    def __init__(self, tmp: Path, port: int | None = None):
        self.tmp = tmp
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / f"{self.name}-{self.port}.log"
        self.start()

    def _cmd(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._cmd(), stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        wait_for(lambda: self.proc.poll() is None and _listening(self.port), 20,
                 f"{self.name} listening on 127.0.0.1:{self.port} (log: {self.log_path})")

    def kill(self) -> None:
        """SIGKILL, as a crash: no goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        wait_for(lambda: not _listening(self.port), 10, f"{self.name} port {self.port} closed")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Mosquitto(_Server):
    """mosquitto with one anonymous loopback listener and no persistence."""

    name = "mosquitto"

    def _cmd(self) -> list[str]:
        conf = self.tmp / f"mosquitto-{self.port}.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        return [need_tool("mosquitto"), "-c", str(conf)]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class RedisServer(_Server):
    """redis-server on loopback, nothing saved to disk."""

    name = "redis"

    def _cmd(self) -> list[str]:
        return [need_tool("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.tmp)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        out = subprocess.run([need_tool("redis-cli"), "-p", str(self.port), *args], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout
