"""Retrieval benchmark: precision@10 on a near-duplicate task from the shipped images.

Every distinct image shipped with pydicom and pydicom-data (first frame, at least 32x32,
deduplicated by pixel hash) is a group: the image plus 10 augmented variants (Gaussian noise
at two levels, shifts of 3% and 6% in two directions, window centre/width changes, and
down-then-up resampling at 1/2 and 3/4). Every image of every group is a query; its 10
nearest neighbours (itself excluded) are found with the same code path as ``image_knn``
(EfficientNet-Lite0 ONNX embeddings, PQ codes, ADC, exact re-rank of ``refine``
candidates); precision@10 is the share of them in the query's own group (1.0 = perfect).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np


def _bases(limit: int) -> Iterator[tuple[str, np.ndarray, Any]]:
    from dicomlake.catalog.sample import template_dirs
    from dicomlake.udfs.errors import PixelError
    from dicomlake.udfs.pixels import load_frames

    seen: set[str] = set()
    for folder in template_dirs():
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in (".dcm", ""):
                continue
            try:
                frames = load_frames(path.read_bytes(), str(path))
            except PixelError:
                continue
            except Exception:  # odd test files (bad headers on purpose) are not images
                continue
            frame = frames.data[0]
            if min(frame.shape[:2]) < 32:
                continue
            digest = hashlib.sha1(np.ascontiguousarray(frame).tobytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            yield str(path), frame, frames
            if len(seen) >= limit:
                return


def _variants(frame: np.ndarray, frames: Any, rng: np.random.Generator
              ) -> list[tuple[np.ndarray, tuple[float, float] | None]]:
    from PIL import Image

    from dicomlake.udfs.pixels import to_uint8

    base_img = to_uint8(frame, frames)
    if frames.window is not None:
        center, width = frames.window
    else:
        lo, hi = np.percentile(frame, (0.5, 99.5))
        center, width = (lo + hi) / 2, max(hi - lo, 1.0)
    spread = float(np.std(frame)) or 1.0
    out: list[tuple[np.ndarray, tuple[float, float] | None]] = []
    for sigma in (0.05, 0.1):
        noisy = frame + rng.normal(0, sigma * spread, frame.shape).astype(np.float32)
        out.append((noisy, (center, width)))
    h, w = frame.shape[:2]
    for frac, axis in ((0.03, 0), (0.03, 1), (0.06, 0), (0.06, 1)):
        out.append((np.roll(frame, int(frac * (h if axis == 0 else w)), axis=axis),
                    (center, width)))
    out.append((frame, (center + 0.1 * width, width)))
    out.append((frame, (center, width * 1.3)))
    for scale in (0.5, 0.75):
        img = Image.fromarray(base_img)
        small = img.resize((max(8, int(w * scale)), max(8, int(h * scale))),
                           Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
        out.append((np.asarray(small), None))  # already windowed
    return out


def run(*, bases: int = 60, m: int = 32, refine: int = 100, seed: int = 3) -> dict[str, Any]:
    """Run the benchmark and return its keys (see the module docstring)."""

    from dicomlake.udfs import model as model_mod
    from dicomlake.udfs import pq
    from dicomlake.udfs.pixels import resize, to_uint8
    from dicomlake.udfs.search import CodeIndex
    from dicomlake.udfs.search import refine as refine_rows

    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    groups: list[int] = []
    for g, (_, frame, frames) in enumerate(_bases(bases)):
        images.append(resize(to_uint8(frame, frames)))
        groups.append(g)
        for data, window in _variants(frame, frames, rng):
            img = data if window is None else to_uint8(data, frames, window)
            images.append(resize(img))
            groups.append(g)
    embedder = model_mod.get_embedder(threads=2)
    vectors = np.concatenate([embedder.embed(np.stack(images[i:i + 32]))
                              for i in range(0, len(images), 32)])
    book = pq.train(vectors, m=m)
    codes, lists = book.encode(vectors)
    n = len(vectors)
    index = CodeIndex.build(book, np.array([str(i) for i in range(n)], dtype=object),
                            np.zeros(n, np.int32), codes, lists)
    labels = np.array(groups)
    exact_rows = np.arange(n, dtype=np.int64)  # index order == input order (one list)
    precision = []
    for i in range(n):
        rows, dist = index.search(vectors[i], max(11, refine))
        rows, _ = refine_rows(rows, dist, vectors[i], vectors, exact_rows)
        top = [r for r in rows.tolist() if r != i][:10]
        precision.append(float(np.mean(labels[top] == labels[i])))
    return {
        "precision_at_10": float(np.mean(precision)),
        "queries": n,
        "groups": int(labels.max() + 1),
        "variants_per_image": 10,
        "m": m,
        "ksub": book.ksub,
        "refine": refine,
    }
