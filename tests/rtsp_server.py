"""A real RTSP camera for tests/test_stream_rtsp.py: GStreamer's RTSP server (gst-rtsp-server)
serving a moving test pattern as H.264 at rtsp://127.0.0.1:PORT/test, on loopback only.

Run by the system Python (/usr/bin/python3), which has GStreamer's introspection bindings from
Debian's packages (the project's virtual environment has none):

    /usr/bin/python3 tests/rtsp_server.py PORT [WIDTH HEIGHT FPS]

It prints `ready` on stdout once it listens, and serves until it is killed. One pipeline is
shared by every client (set_shared), so a client that reconnects gets the running stream.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PATH = "/test"


def main() -> None:
    port = int(sys.argv[1])
    width, height, fps = (int(v) for v in sys.argv[2:5]) if len(sys.argv) >= 5 else (160, 120, 15)
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    # a key frame every second (key-int-max) so that a client joining mid-stream decodes within one
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate={fps}/1 "
        f"! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
        f"! rtph264pay name=pay0 pt=96 config-interval=1 )")
    factory.set_shared(True)
    server.get_mount_points().add_factory(PATH, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
