#!/usr/bin/python3
"""A real RTSP test server (GStreamer gst-rtsp-server); run with Debian's /usr/bin/python3 + python3-gi, not the venv.

  /usr/bin/python3 tests/rtsp_server.py --media demo.mp4 --port 8554 --path cam [--user u --password p]
  /usr/bin/python3 tests/rtsp_server.py --live --port 0          # videotestsrc, encoded live with x264

Serves rtsp://127.0.0.1:PORT/PATH (loopback only). An H.264 mp4 is first remuxed to an Annex-B elementary stream
(pure GStreamer, once) and then played forever in real time by `multifilesrc loop=true`, with continuous timestamps,
so one client session never sees an end of stream. Prints one line "READY rtsp://127.0.0.1:PORT/PATH" (no
credentials) once listening, and exits 0 on SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def remux_to_annexb(src: str, dst: str) -> None:
    """mp4/mkv/mov with H.264 -> byte-stream .h264 that multifilesrc can replay seamlessly."""
    demux = "matroskademux" if src.lower().endswith((".mkv", ".webm")) else "qtdemux"
    pipe = Gst.parse_launch(
        f"filesrc location={_quote(src)} ! {demux} ! h264parse ! "
        f"video/x-h264,stream-format=byte-stream,alignment=au ! filesink location={_quote(dst)}")
    pipe.set_state(Gst.State.PLAYING)
    msg = pipe.get_bus().timed_pop_filtered(60 * Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
    pipe.set_state(Gst.State.NULL)
    if msg is None or msg.type == Gst.MessageType.ERROR:
        detail = msg.parse_error()[0].message if msg is not None else "timed out"
        raise SystemExit(f"rtsp_server: cannot remux {src} to H.264 byte-stream: {detail}")


def _quote(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pts_from_dts(_pad, info):
    """An elementary stream has no PTS; h264parse interpolates DTS (the file has no B-frames, so PTS == DTS)."""
    buf = info.get_buffer()
    if buf is not None and buf.pts == Gst.CLOCK_TIME_NONE:
        buf.pts = buf.dts
    return Gst.PadProbeReturn.OK


def _on_media_configure(_factory, media) -> None:
    parse = media.get_element().get_by_name("parse")
    if parse is not None:
        parse.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, _pts_from_dts)


def launch_line(args: argparse.Namespace, annexb: str | None) -> str:
    pay = "rtph264pay name=pay0 pt=96 config-interval=1"
    if args.once:
        return f"( filesrc location={_quote(args.media)} ! qtdemux ! h264parse ! {pay} )"
    if annexb is not None:
        return f"( multifilesrc location={_quote(annexb)} loop=true ! h264parse name=parse ! video/x-h264,alignment=au ! {pay} )"
    w, h = args.size.split("x")
    return (f"( videotestsrc is-live=true pattern={args.pattern} ! video/x-raw,width={w},height={h},"
            f"framerate={args.fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} "
            f"bframes=0 ! video/x-h264,profile=constrained-baseline ! {pay} )")


def _cached_annexb(media: str) -> str:
    """The media remuxed to Annex-B once per content, in one shared cache folder: a server killed with SIGKILL
    (the outage tests) leaves nothing behind, and a thousand restarts reuse one file. Entries unused for a day are
    removed, so the folder stays bounded across test runs."""
    import hashlib
    import time

    with open(media, "rb") as f:
        key = hashlib.file_digest(f, "sha1").hexdigest()[:20]
    folder = os.path.join(tempfile.gettempdir(), "agecam-rtsp-cache")
    os.makedirs(folder, exist_ok=True)
    for old in os.scandir(folder):
        try:
            if time.time() - old.stat().st_mtime > 86400:
                os.unlink(old.path)
        except OSError:
            pass
    out = os.path.join(folder, f"{key}.h264")
    if not os.path.exists(out):
        part = f"{out}.{os.getpid()}.part"
        remux_to_annexb(media, part)
        os.replace(part, out)  # atomic: concurrent servers never read a half-written file
    else:
        os.utime(out)  # used now: kept another day
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--media", help="H.264 file to serve in a loop (.mp4/.mov/.mkv, or an Annex-B .h264)")
    src.add_argument("--live", action="store_true", help="serve a live videotestsrc instead")
    ap.add_argument("--once", action="store_true", help="serve the mp4 once through qtdemux (no loop)")
    ap.add_argument("--port", type=int, default=8554, help="TCP port; 0 picks a free one (printed in READY)")
    ap.add_argument("--path", default="cam", help="mount path without the leading slash")
    ap.add_argument("--user", help="require basic auth with this user")
    ap.add_argument("--password", help="password for --user")
    ap.add_argument("--size", default="320x240", help="live source size WxH")
    ap.add_argument("--fps", type=int, default=15, help="live source frame rate")
    ap.add_argument("--pattern", default="ball", help="videotestsrc pattern for --live")
    args = ap.parse_args()
    if bool(args.user) != bool(args.password):
        ap.error("--user and --password go together")

    Gst.init(None)
    annexb = None
    if args.media:
        if not os.path.isfile(args.media):
            ap.error(f"no such file: {args.media}")
        if args.media.lower().endswith((".h264", ".264")):
            annexb = args.media
        else:
            annexb = _cached_annexb(args.media)

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(args, annexb))
    factory.set_shared(True)  # every client of this mount watches the same stream
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password), token)
        server.set_auth(auth)
        factory.add_role_from_structure(Gst.Structure.from_string(
            "viewer, media.factory.access=(boolean)true, media.factory.construct=(boolean)true")[0])
    factory.connect("media-configure", _on_media_configure)
    server.get_mount_points().add_factory("/" + args.path.lstrip("/"), factory)

    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        print(f"rtsp_server: cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"READY rtsp://127.0.0.1:{server.get_bound_port()}/{args.path.lstrip('/')}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
