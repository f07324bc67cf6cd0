"""The age service thread: one batched age inference shared by every camera's pipeline."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from agecam.daemon.metrics import NullMetrics
from agecam.daemon.worker import Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgeRequest:
    """One face chip to age, and where its answer goes."""

    camera: str
    track_id: int
    chip: np.ndarray
    weight: float
    ts: float
    reply: "queue.Queue[AgeResult]"
    min_std_years: float = 0.0  # a floor on the sample's spread (crops let through below the quality gate)


@dataclass(frozen=True)
class AgeResult:
    """The model's age distribution for one request."""

    track_id: int
    probs: np.ndarray
    weight: float
    ts: float
    min_std_years: float = 0.0


class AgeService(Worker):
    """Collects requests from all pipelines and runs them in batches of up to max_batch."""

    def __init__(self, model, max_batch: int, stop: threading.Event, metrics: NullMetrics = NullMetrics(),
                 queue_size: int = 256):
        super().__init__("age")
        self.model = model
        self.max_batch = max_batch
        self._stop = stop
        self._metrics = metrics
        self._queue: queue.Queue[AgeRequest] = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        self.batches = 0
        self.faces = 0

    def submit(self, req: AgeRequest) -> bool:
        """Queue a chip without blocking; False (and counted) when the service is saturated."""
        try:
            self._queue.put_nowait(req)
            return True
        except queue.Full:
            self.dropped += 1
            self._metrics.frame_dropped(req.camera, "age")
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat_s = time.monotonic()
            try:
                batch = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                t0 = time.perf_counter()
                probs = self.model.predict(np.stack([r.chip for r in batch]))
                self._metrics.age_batch([r.camera for r in batch], time.perf_counter() - t0)
            except Exception:  # a bad batch must not kill the service
                log.exception("age inference failed for a batch of %d; skipping it", len(batch))
                continue
            self.batches += 1
            self.faces += len(batch)
            for req, p in zip(batch, probs):
                try:
                    req.reply.put_nowait(AgeResult(req.track_id, p, req.weight, req.ts, req.min_std_years))
                except queue.Full:
                    pass  # the pipeline is gone or far behind; the sample is simply lost

