"""`agecam events`: subscribe (ZeroMQ, MQTT or a Redis stream) and print one JSON event per line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agecam import exits


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("events", help="print events from a daemon's bus or a broker, one JSON object per line")
    p.add_argument("--connect", default="tcp://127.0.0.1:5556",
                   help="tcp://HOST:PORT (a daemon's events.bind), mqtt(s)://[USER:PASS@]HOST[:PORT] or "
                   "redis(s)://[:PASS@]HOST[:PORT][/DB] (a sink's broker)")
    p.add_argument("--type", dest="prefixes", action="append", default=[],
                   help="'<type>/<camera>' prefix to keep, e.g. 'track.' or 'track.end/lobby' (repeatable; default: all)")
    p.add_argument("--instance", dest="instances", action="append", default=[],
                   help="keep only this daemon instance (repeatable; default: all)")
    p.add_argument("--count", type=int, default=0, help="exit after this many events (0: run until interrupted)")
    p.add_argument("--timeout", type=float, default=0.0, help="exit after this many seconds without an event (0: never)")
    p.add_argument("--server-key", type=Path, default=None,
                   help="ZeroMQ: the daemon's public certificate (NAME.key): subscribe with CURVE encryption")
    p.add_argument("--client-key", type=Path, default=None,
                   help="ZeroMQ: this subscriber's secret certificate (NAME.key_secret), whose public half the daemon allows")
    p.add_argument("--topic-prefix", default="agecam", help="MQTT: the sink's topic_prefix")
    p.add_argument("--stream", default="agecam:events", help="Redis: the sink's stream key")
    p.add_argument("--group", default=None,
                   help="Redis: read through this consumer group (acknowledged as printed; a restart resumes)")
    p.add_argument("--consumer", default=None, help="Redis: consumer name in the group (default: the host name; "
                   "give a stable one where host names change)")
    p.add_argument("--password-env", metavar="VAR", default=None,
                   help="MQTT/Redis: read the broker password from this environment variable (not the command line, "
                   "where ps shows it); the user goes in the URL")
    p.set_defaults(func=events_command)


def events_command(args) -> int:
    from agecam.client import subscribe
    from agecam.keys import CertificateError
    from agecam.secrets import secret_free

    scheme = args.connect.split("://", 1)[0]
    options: dict = {"types": args.prefixes, "instances": args.instances}
    if scheme in ("tcp", "ipc", "inproc"):
        if (args.server_key is None) != (args.client_key is None):
            print("agecam events: --server-key and --client-key go together (CURVE needs both)", file=sys.stderr)
            return exits.USAGE
        options.update(server_key=args.server_key, client_key=args.client_key)
    elif scheme in ("mqtt", "mqtts", "redis", "rediss"):
        if args.password_env:
            import os

            if args.password_env not in os.environ:
                print(f"agecam events: --password-env: {args.password_env} is not set", file=sys.stderr)
                return exits.USAGE
            options.update(password=os.environ[args.password_env])
        if scheme.startswith("mqtt"):
            options.update(topic_prefix=args.topic_prefix)
        else:
            options.update(stream=args.stream, group=args.group, consumer=args.consumer)
    try:
        sub = subscribe(args.connect, **options)
    except (CertificateError, FileNotFoundError, ValueError) as exc:
        print(f"agecam events: {secret_free(str(exc))}", file=sys.stderr)
        return exits.USAGE
    seen = 0
    printed_id = None  # the entry printed last: only that one is acknowledged at the end (Redis groups)
    try:
        while not args.count or seen < args.count:
            try:
                event = sub.next(args.timeout or None)
            except TimeoutError:
                print(f"no event for {args.timeout:g} s from {secret_free(args.connect)}", file=sys.stderr)
                return exits.NO_EVENTS
            sys.stdout.write(event.to_json() + "\n")
            sys.stdout.flush()
            printed_id = getattr(sub, "last_id", None)
            seen += 1
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:  # an entry handed out but interrupted before it was printed stays pending, for the next start
        sub.close(ack_last=getattr(sub, "last_id", None) == printed_id)
    return exits.OK
