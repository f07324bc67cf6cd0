"""Network address checks for the config: HOST:PORT binds, loopback decided on resolved addresses, token length."""
from __future__ import annotations

import ipaddress
import re
import socket

MIN_TOKEN_CHARS = 16


def check_token(v: str | None) -> str | None:
    """A token of at least MIN_TOKEN_CHARS characters, or None."""
    if v is not None and len(v) < MIN_TOKEN_CHARS:
        raise ValueError(f"must be at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 16`)")
    return v


def is_loopback_host(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address (decided on addresses, not on spelling)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False  # unresolvable: not known to be loopback
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_host_port(v: str | None) -> str | None:
    """A HOST:PORT bind with a port from 0 to 65535, or None."""
    if v is None:
        return v
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})", v)
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise ValueError("expected HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:9108")
    return v
