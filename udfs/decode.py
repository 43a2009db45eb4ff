"""A Spark-free decode stage that keeps a fast model busy: frames decoded in worker processes.

On a GPU the network embeds tens of thousands of images a second and decoding pixels (JPEG,
JPEG 2000, RLE, windowing, resizing) becomes the limit, so decoding runs in a pool of worker
processes (one per core by default) while the caller's process runs the model. Each worker
does exactly what :mod:`dicomlake.udfs.pixels` does (it calls :func:`~.pixels.model_inputs` or
:func:`~.pixels.frame_inputs`: one preprocessing path, so vectors do not depend on which path
decoded an image). Results come back in input order, a bounded number of chunks in flight
(memory stays flat however long the input), and an image that cannot be read or decoded
comes back as an entry carrying its :class:`~.errors.PixelError` instead of stopping the
stream. :class:`StageTimes` measures each stage.

Workers are started with ``spawn``: the caller may hold a CUDA context, a JVM or thread pools,
none of which survives a ``fork``. Starting them costs about a second, so a caller that decodes
several streams keeps one :class:`DecodePool`.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from dicomlake.udfs.errors import PixelError, PixelErrorKind
from dicomlake.udfs.pixels import MODEL_SIZE, frame_inputs, model_inputs, read_bytes

_EMPTY = np.zeros((0, MODEL_SIZE, MODEL_SIZE, 3), np.uint8)


def all_cores() -> int:
    """Cores this process may run on (the default number of decode workers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Decoded:
    """One input's model inputs, or the reason it has none (``error``)."""

    index: int
    """Position in the input stream."""
    path: str
    images: np.ndarray
    """(frames, 224, 224, 3) uint8; no frames when ``error`` is set."""
    thumbnails: tuple[bytes, ...]
    """One PNG per frame when thumbnails were asked for, else empty."""
    error: PixelError | None
    seconds: float
    """Time the decode took where it ran (in a worker: not seen by the caller)."""


@dataclass
class StageTimes:
    """Per-stage measurements of one run (seconds are wall time unless said otherwise)."""

    inputs: int = 0
    frames: int = 0
    errors: int = 0
    decode_seconds: float = 0.0
    """Decode time summed over the workers (divide by the workers for the stage's share)."""
    wait_seconds: float = 0.0
    """Time the caller waited for decoded images: near zero when decoding keeps up."""
    model_seconds: float = 0.0
    """Time in the model (filled in by the caller that runs it)."""


class DecodePool:
    """Started decode processes with the decoders imported, reusable across streams."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or all_cores()
        self.executor = ProcessPoolExecutor(self.workers,
                                            mp_context=multiprocessing.get_context("spawn"))
        # one call per worker, submitted at once: every process starts (and imports) now
        for done in [self.executor.submit(_warm) for _ in range(self.workers)]:
            done.result()

    def close(self) -> None:
        """Stop the processes (waits for work in progress)."""
        self.executor.shutdown()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _warm() -> None:
    """Import what decoding needs (pydicom and its pixel plug-ins, PIL) in a new worker."""
    import pydicom.pixels  # noqa: F401
    from PIL import Image  # noqa: F401


_Job = tuple[int, str, bytes | None]
"""(index, path, bytes or None: read by path) as sent to a worker."""
_Result = tuple[int, str, np.ndarray, tuple[bytes, ...], tuple[str, str] | None, float]
"""A worker's answer; a PixelError travels as (kind, message): it does not pickle."""


def _decode(job: _Job, thumbnails: bool) -> _Result:
    index, path, data = job
    started = time.perf_counter()
    try:
        raw = read_bytes(path) if data is None else data
        if thumbnails:
            pairs = frame_inputs(raw, path)
            images, thumbs = np.stack([p[0] for p in pairs]), tuple(p[1] for p in pairs)
        else:
            images, thumbs = model_inputs(path, raw), ()
    except PixelError as exc:
        return index, path, _EMPTY, (), (exc.kind.value, str(exc)), time.perf_counter() - started
    return index, path, images, thumbs, None, time.perf_counter() - started


def _decode_chunk(jobs: list[_Job], thumbnails: bool) -> list[_Result]:
    """Worker entry point: a few inputs per call, so the hand-over cost is shared."""
    return [_decode(job, thumbnails) for job in jobs]


def _decoded(result: _Result, stats: StageTimes | None) -> Decoded:
    index, path, images, thumbs, error, seconds = result
    failure = PixelError(PixelErrorKind(error[0]), error[1]) if error else None
    if stats is not None:
        stats.inputs += 1
        stats.frames += len(images)
        stats.errors += failure is not None
        stats.decode_seconds += seconds
    return Decoded(index, path, images, thumbs, failure, seconds)


def decode_stream(items: Iterable[tuple[str, bytes | None]], *,
                  workers: int | DecodePool = 0, thumbnails: bool = False, chunk: int = 4,
                  in_flight: int | None = None, stats: StageTimes | None = None,
                  ) -> Iterator[Decoded]:
    """Decode ``(path, bytes or None)`` items, yielding them in input order.

    Args:
        items: what to decode; ``None`` bytes are read by path (archive members too).
        workers: decode processes to start for this stream, or a started pool to use;
            0 decodes in this process (no pool to start).
        thumbnails: also make each frame's PNG thumbnail (as ``dicom.embeddings`` stores).
        chunk: inputs per worker call.
        in_flight: chunks submitted ahead of the one being consumed (default: 4 per
            worker), which bounds memory and keeps every worker busy.
        stats: filled in as items come back.
    """
    jobs = ((i, path, data) for i, (path, data) in enumerate(items))
    if isinstance(workers, DecodePool):
        yield from _pooled(jobs, workers, thumbnails, chunk, in_flight, stats)
        return
    if workers <= 0:
        for job in jobs:
            yield _decoded(_decode(job, thumbnails), stats)
        return
    with DecodePool(workers) as pool:
        yield from _pooled(jobs, pool, thumbnails, chunk, in_flight, stats)


def _pooled(jobs: Iterator[_Job], pool: DecodePool, thumbnails: bool, chunk: int,
            in_flight: int | None, stats: StageTimes | None) -> Iterator[Decoded]:
    limit = in_flight or 4 * pool.workers
    pending: deque[Future[list[_Result]]] = deque()
    exhausted = False
    while True:
        while not exhausted and len(pending) < limit:
            batch = list(itertools.islice(jobs, chunk))
            if not batch:
                exhausted = True
                break
            pending.append(pool.executor.submit(_decode_chunk, batch, thumbnails))
        if not pending:
            return
        started = time.perf_counter()
        results = pending.popleft().result()
        if stats is not None:
            stats.wait_seconds += time.perf_counter() - started
        for result in results:
            yield _decoded(result, stats)


def model_batches(decoded: Iterable[Decoded], batch_size: int,
                  ) -> Iterator[tuple[np.ndarray, list[Decoded]]]:
    """Frames of consecutive inputs in (n, 224, 224, 3) batches of about ``batch_size``
    (an input's frames stay in one batch), with the inputs each batch holds, failed ones
    included so the caller can record their errors in order."""
    frames: list[np.ndarray] = []
    held: list[Decoded] = []
    count = 0
    for item in decoded:
        held.append(item)
        if len(item.images):
            frames.append(item.images)
            count += len(item.images)
        if count >= batch_size:
            yield np.concatenate(frames), held
            frames, held, count = [], [], 0
    if held:
        yield (np.concatenate(frames) if frames else _EMPTY), held
