"""Secrets: `${env:NAME}` / `${cred:NAME}` references resolved at config load, and scrubbing them from any text.

A config can keep RTSP passwords and tokens out of its YAML: any string value may contain `${env:NAME}` (an
environment variable) or `${cred:NAME}` (a file in systemd's $CREDENTIALS_DIRECTORY, from `LoadCredential=`).
Resolved values are registered as secrets, so logs never show them; errors name the reference, never the value.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

SECRET_REF = re.compile(r"\$\{(env|cred):([A-Za-z_][A-Za-z0-9_.-]*)\}")
# query keys whose values are credentials (matched anywhere in the key: `auth_token`, `pass`, `pw`, `api_key`, ...)
_CREDENTIAL_KEY = r"[\w.-]*?(?:token|pass|pw|pwd|secret|key|auth|sig|credential|session)[\w.-]*"
_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")  # greedy: everything up to the last '@' of the authority
_QUERY_CREDENTIAL = re.compile(rf"(?i)([?&;]{_CREDENTIAL_KEY}=)[^&#;\s]*")


class SecretRefError(ValueError):
    """A secret reference that cannot be resolved; the message names the reference, never a value."""


def secret_free(text: str | int) -> str:
    """Text (typically a URL) as it may appear in logs, metrics, events and errors: userinfo and credentials gone."""
    s = str(text)
    s = _USERINFO.sub("***@", s)
    return _QUERY_CREDENTIAL.sub(r"\1***", s)


def url_secrets(text: str | int) -> list[str]:
    """The secret parts of a URL: its whole userinfo, its password alone, and every credential-like query value."""
    s = str(text)
    found = []
    m = _USERINFO.search(s)
    if m:
        userinfo = m.group(0)[:-1]
        found.append(userinfo)
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
    found += [v.split("=", 1)[1] for v in re.findall(rf"(?i)[?&;]{_CREDENTIAL_KEY}=[^&#;\s]*", s) if "=" in v]
    return [f for f in found if f]


def _resolve_one(kind: str, name: str, environ, credentials_dir: str | None) -> str:
    if kind == "env":
        if name not in environ:
            raise SecretRefError(f"environment variable {name} is not set (referenced as ${{env:{name}}})")
        return environ[name]
    if not credentials_dir:
        raise SecretRefError(f"${{cred:{name}}} needs systemd credentials ($CREDENTIALS_DIRECTORY is not set; "
                             f"use LoadCredential={name}:FILE in the unit)")
    path = Path(credentials_dir) / name
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise SecretRefError(f"credential {name} cannot be read from $CREDENTIALS_DIRECTORY: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretRefError(f"credential {name} is not UTF-8 text") from None


def resolve_refs(data, environ=None, path: str = "") -> tuple[object, list[str], list[str]]:
    """(data with every reference replaced, errors as 'path: message', the secret values resolved)."""
    environ = os.environ if environ is None else environ
    creds = environ.get("CREDENTIALS_DIRECTORY")
    errors: list[str] = []
    values: list[str] = []

    def walk(node, where: str):
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            def sub(m: re.Match) -> str:
                try:
                    value = _resolve_one(m.group(1), m.group(2), environ, creds)
                except SecretRefError as exc:
                    errors.append(f"{where or '(top level)'}: {exc}")
                    return ""
                values.append(value)
                return value
            return SECRET_REF.sub(sub, node)
        return node

    return walk(data, path), errors, values
