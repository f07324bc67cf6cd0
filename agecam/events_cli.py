"""`agecam events`: subscribe to a daemon and print one JSON event per line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agecam import exits


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("events", help="print events from a running daemon, one JSON object per line")
    p.add_argument("--connect", default="tcp://127.0.0.1:5556", help="the daemon's events.bind address")
    p.add_argument("--type", dest="prefixes", action="append", default=[],
                   help="topic prefix to keep, e.g. 'track.' or 'track.end/lobby' (repeatable; default: all)")
    p.add_argument("--count", type=int, default=0, help="exit after this many events (0: run until interrupted)")
    p.add_argument("--timeout", type=float, default=0.0, help="exit after this many seconds without an event (0: never)")
    p.add_argument("--server-key", type=Path, default=None,
                   help="the daemon's public certificate (NAME.key): subscribe with CURVE encryption")
    p.add_argument("--client-key", type=Path, default=None,
                   help="this subscriber's secret certificate (NAME.key_secret), whose public half the daemon allows")
    p.set_defaults(func=events_command)


def events_command(args) -> int:
    import zmq

    from agecam.keys import CertificateError, load_public, load_secret

    sock = zmq.Context.instance().socket(zmq.SUB)
    if (args.server_key is None) != (args.client_key is None):
        print("agecam events: --server-key and --client-key go together (CURVE needs both)", file=sys.stderr)
        return exits.USAGE
    if args.server_key is not None:
        try:
            sock.curve_serverkey = load_public(args.server_key, "--server-key")
            sock.curve_publickey, sock.curve_secretkey = load_secret(args.client_key, "--client-key")
        except (CertificateError, FileNotFoundError) as exc:
            print(f"agecam events: {exc}", file=sys.stderr)
            sock.close(0)
            return exits.USAGE
    sock.connect(args.connect)
    for prefix in args.prefixes or [""]:
        sock.setsockopt_string(zmq.SUBSCRIBE, prefix)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    seen = 0
    try:
        while not args.count or seen < args.count:
            if not poller.poll(int(args.timeout * 1000) if args.timeout else None):
                print(f"no event for {args.timeout:g} s from {args.connect}", file=sys.stderr)
                return exits.NO_EVENTS
            _topic, payload = sock.recv_multipart()
            sys.stdout.write(payload.decode() + "\n")
            sys.stdout.flush()
            seen += 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        pass
    finally:
        sock.close(0)
    return exits.OK
