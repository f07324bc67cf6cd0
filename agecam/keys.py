"""`agecam keys generate`: ZeroMQ CURVE certificate pairs for the daemon and its subscribers (pyzmq's zmq.auth)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agecam import exits


class CertificateError(ValueError):
    """A key file that is not the ZeroMQ certificate expected; the message names the setting and the file."""


def generate(key_dir: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write DIR/NAME.key (public, shareable) and DIR/NAME.key_secret (0600); refuse to overwrite unless force."""
    import zmq.auth

    d = Path(key_dir)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise FileExistsError(f"{public} or {secret} already exists (use --force to replace the pair)")
    d.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even for an instant
    try:
        pub_path, sec_path = zmq.auth.create_certificates(str(d), name)
    finally:
        os.umask(old_umask)
    os.chmod(sec_path, 0o600)
    os.chmod(pub_path, 0o644)
    return Path(pub_path), Path(sec_path)


def load_secret(path: str | Path, what: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a *.key_secret certificate; ValueError saying what was expected."""
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected a secret certificate file (NAME.key_secret from `agecam keys "
                                f"generate`), found nothing at {path}")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise CertificateError(f"{what}: {path} is not a ZeroMQ certificate ({exc})") from None
    if not secret:
        raise CertificateError(f"{what}: {path} holds only a public key; give the NAME.key_secret file")
    return public, secret


def load_public(path: str | Path, what: str) -> bytes:
    """The Z85 public key of a certificate file (NAME.key or NAME.key_secret)."""
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected a certificate file (NAME.key), found nothing at {path}")
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise CertificateError(f"{what}: {path} is not a ZeroMQ certificate ({exc})") from None
    return public


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="CURVE keys for encrypted, allow-listed events")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    g = ksub.add_parser("generate", help="write DIR/NAME.key (public) and DIR/NAME.key_secret (mode 0600)")
    g.add_argument("--dir", required=True, type=Path, help="folder for the pair (created if missing)")
    g.add_argument("--name", required=True, help="name of the pair, e.g. 'server' or a subscriber's name")
    g.add_argument("--force", action="store_true", help="replace an existing pair")
    g.set_defaults(func=_generate_command)


def _generate_command(args) -> int:
    try:
        public, secret = generate(args.dir, args.name, args.force)
    except (FileExistsError, OSError) as exc:
        print(f"agecam keys generate: {exc}", file=sys.stderr)
        return exits.USAGE
    print(f"public key (give it out; subscribers' go in events.curve.authorized_clients): {public}")
    print(f"secret key (keep it, mode 0600): {secret}")
    return exits.OK
