"""agecam: real-time age estimation from cameras, files and RTSP streams, published over ZeroMQ."""
__version__ = "0.2.0"
