"""Retrieval benchmark on the shipped images: near-duplicates and object membership.

The images are every decodable picture shipped with pydicom and pydicom-data (first frame, at
least 32x32, not flat). Those files hold one picture many times over (the same MR, CR, US or
RGB image as uncompressed, big-endian, RLE, JPEG, JPEG-LS and JPEG 2000, lossless and lossy,
and 30 frames of one cine re-encoded at half size), so counting each file, or each exact
pixel hash, as its own picture makes near-identical images count as "wrong" neighbours and
the score measures the test set rather than the search.

**Perceptual groups.** Each image is reduced to a signature: the display image (windowed as
for the model), averaged to gray, box-filtered to 32x32, minus its mean, scaled to unit
length. Two images whose signatures correlate at >= ``TWIN_CORRELATION`` (0.97) are one
picture; groups are the connected components of that relation, built in path order, so the
result is deterministic. A pixel signature and not the embedding decides, because grouping by
the model under test would let the model define its own ground truth (pictures it confuses
would be merged and stop counting as errors). On the shipped set the lossy twins correlate
at >= 0.979 (12-bit JPEG of the NM image) and the closest distinct pictures (two adjacent CT
slices, ``693_UNCI``/``693_UNCR``) at 0.960; nothing else distinct passes 0.77.
``raw_images`` and ``perceptual_groups`` report the collapse; each group's picture is taken
from a losslessly stored member when it has one.

**Near-duplicate task** (``precision_at_10``): the first ``bases`` groups each give their
picture plus 10 variants of four kinds: ``noise`` (Gaussian, 5% and 10% of the frame's
spread), ``shift`` (circular, 3% and 6% of height and width), ``window`` (centre +10% of the
width, width x1.3; the same linear maps on the 0..255 scale for colour images) and
``resample`` (down to 1/2 and 3/4, back up). Every image is a query; precision@10 is the share
of its 10 nearest neighbours (itself excluded) in its own group, overall and per kind
(``precision_at_10_by_kind``, ``original`` being the unaltered pictures).

**Membership task** (``membership_precision_at_10``), no augmentation: objects are the
multi-frame instances with >= 8 frames (one per perceptual group: the longest) and the series
(same study, series, modality and size) holding >= 8 distinct single-frame pictures. Every
frame of every object is a query against all object frames plus the task-1 pictures of the
other groups (``membership_distractors``); precision@10 is the share of its 10 nearest
neighbours (itself excluded) from its own object, divided by ``min(10, frames - 1)`` so that
a 10-frame object can score 1. The score is averaged per object, then over objects
(``membership_precision_at_10_by_object``), so a 120-frame cine does not drown a 10-frame MR.
The shipped files give two objects (an MR of 10 frames, an ultrasound cine of 120) and no
series with 8 distinct pictures.

Both tasks search with the same code path as ``image_knn``: EfficientNet-Lite0 ONNX
embeddings, PQ codes (``m`` sub-spaces, trained on the task's vectors), ADC scan, exact
re-rank of ``refine`` candidates.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dicomlake.udfs.pixels import Frames

K = 10
"""Neighbours judged per query (precision@10)."""
MIN_SIDE = 32
"""Smaller images (16x16 DICOMDIR test icons, 10x10 dose grids) are not pictures to search."""
SIGNATURE_SIDE = 32
"""Side of the gray thumbnail compared to find lossy twins."""
TWIN_CORRELATION = 0.97
"""Signature correlation from which two images are one picture (see the module docstring)."""
MIN_OBJECT_FRAMES = 8
"""Frames (or distinct series pictures) an object needs to take part in the membership task."""
KINDS = ("original", "noise", "shift", "window", "resample")
"""Augmentation kinds of the near-duplicate task, in report order."""

_LOSSY_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy allowed)
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component (lossy allowed)
    "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy allowed)
})


@dataclass(frozen=True)
class ShippedImage:
    """One decodable shipped file: its frames (all of them only when it can be an object)."""

    path: str
    frames: Frames
    count: int
    lossy: bool
    series: tuple[str, str, str, int, int] | None
    signature: np.ndarray

    @property
    def name(self) -> str:
        return Path(self.path).name

    def display(self, index: int = 0) -> np.ndarray:
        """Frame ``index`` windowed to uint8, as the model's input is made."""
        from dicomlake.udfs.pixels import to_uint8

        return to_uint8(self.frames.data[index], self.frames)


@dataclass(frozen=True)
class MemberObject:
    """A multi-frame instance or a series: the frames that should find each other."""

    name: str
    kind: str
    frames: tuple[np.ndarray, ...]
    groups: frozenset[int]


def signature(display: np.ndarray) -> np.ndarray | None:
    """Unit-length, zero-mean 32x32 gray thumbnail; None for a flat image (no picture)."""
    from PIL import Image

    gray = display.astype(np.float32)
    if gray.ndim == 3:
        gray = gray.mean(axis=2)
    small = np.asarray(Image.fromarray(gray).resize((SIGNATURE_SIDE, SIGNATURE_SIDE),
                                                    Image.Resampling.BOX), dtype=np.float64)
    centred = (small - small.mean()).ravel()
    norm = float(np.linalg.norm(centred))
    if norm < 1e-3 * SIGNATURE_SIDE:  # under ~1/1000 of a gray level per pixel: blank
        return None
    return centred / norm


def _series_key(header: Any) -> tuple[str, str, str, int, int] | None:
    series = str(header.get("SeriesInstanceUID", "") or "")
    if not series:
        return None
    return (str(header.get("StudyInstanceUID", "") or ""), series,
            str(header.get("Modality", "") or ""), int(header.get("Rows", 0) or 0),
            int(header.get("Columns", 0) or 0))


def _is_lossy(header: Any) -> bool:
    meta = getattr(header, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return syntax in _LOSSY_SYNTAXES or str(header.get("LossyImageCompression", "")) == "01"


def shipped_images() -> list[ShippedImage]:
    """Every shipped image worth searching, in a fixed order (folders, then sorted paths).

    pydicom's test files include broken and odd files on purpose; whatever cannot be decoded
    is not an image, and their warnings are silenced here.
    """
    from pydicom import dcmread

    from dicomlake.catalog.sample import template_dirs
    from dicomlake.udfs.pixels import load_frames, to_uint8

    out: list[ShippedImage] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for folder in template_dirs():
            for path in sorted(folder.rglob("*")):
                if not path.is_file() or path.suffix.lower() not in (".dcm", ""):
                    continue
                data = path.read_bytes()
                try:
                    frames = load_frames(data, str(path))
                    header = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
                except Exception:  # PixelError, or a header broken on purpose
                    continue
                if min(frames.data.shape[1:3]) < MIN_SIDE:
                    continue
                sig = signature(to_uint8(frames.data[0], frames))
                if sig is None:
                    continue
                count = frames.count
                if count < MIN_OBJECT_FRAMES:  # only objects need more than the first frame
                    frames = replace(frames, data=frames.data[:1])
                out.append(ShippedImage(str(path), frames, count, _is_lossy(header),
                                        _series_key(header), sig))
    return out


def perceptual_groups(images: list[ShippedImage]) -> list[list[int]]:
    """Indices of ``images`` per picture: connected components of signature correlation
    >= ``TWIN_CORRELATION``, each sorted, ordered by their first member."""
    n = len(images)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n:
        sigs = np.stack([im.signature for im in images])
        close = np.argwhere(np.triu(sigs @ sigs.T >= TWIN_CORRELATION, k=1))
        for i, j in close.tolist():
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    return sorted(members.values(), key=lambda group: group[0])


def representative(images: list[ShippedImage], group: list[int]) -> int:
    """The member a group's picture is taken from: the first one stored losslessly, if any."""
    return min(group, key=lambda i: (images[i].lossy, i))


def membership_objects(images: list[ShippedImage], groups: list[list[int]]
                       ) -> list[MemberObject]:
    """Multi-frame instances (the longest per picture) and series with enough distinct
    pictures; an object's groups are never shared with another object."""
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    longest: dict[int, int] = {}
    for i, image in enumerate(images):
        if image.count >= MIN_OBJECT_FRAMES:
            g = group_of[i]
            if g not in longest or image.count > images[longest[g]].count:
                longest[g] = i
    objects = [MemberObject(images[i].name, "multiframe",
                            tuple(images[i].display(f) for f in range(images[i].count)),
                            frozenset({g}))
               for g, i in sorted(longest.items())]
    claimed = set(longest)
    series: dict[tuple[str, str, str, int, int], dict[int, int]] = {}
    for i, image in enumerate(images):
        if image.count == 1 and image.series is not None:
            series.setdefault(image.series, {}).setdefault(group_of[i], i)
    for key, by_group in series.items():
        free = {g: i for g, i in by_group.items() if g not in claimed}
        if len(free) < MIN_OBJECT_FRAMES:
            continue
        claimed.update(free)
        objects.append(MemberObject(f"series {key[1]}", "series",
                                    tuple(images[i].display() for i in free.values()),
                                    frozenset(free)))
    return objects


def _variants(image: ShippedImage, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """The 10 altered copies of one picture as (kind, uint8 display image)."""
    from PIL import Image

    from dicomlake.udfs.pixels import to_uint8

    frame, frames = image.frames.data[0], image.frames
    base = image.display()
    if frames.window is not None:
        center, width = frames.window
    else:  # fix the percentile window of the original, so only the change under test acts
        lo, hi = np.percentile(frame, (0.5, 99.5))
        center, width = float(lo + hi) / 2, max(float(hi - lo), 1.0)
    spread = float(np.std(frame)) or 1.0
    out: list[tuple[str, np.ndarray]] = []
    for sigma in (0.05, 0.1):
        noisy = frame.astype(np.float32) + rng.normal(0, sigma * spread, frame.shape
                                                      ).astype(np.float32)
        out.append(("noise", to_uint8(noisy, frames, (center, width))))
    h, w = base.shape[:2]
    for frac, axis in ((0.03, 0), (0.03, 1), (0.06, 0), (0.06, 1)):
        out.append(("shift", np.roll(base, int(frac * (h if axis == 0 else w)), axis=axis)))
    for shift, stretch in ((0.1, 1.0), (0.0, 1.3)):
        if frames.color:  # colour ignores windows: the same map on the 0..255 scale
            c, wd = 127.5 + shift * 255.0, 255.0 * stretch
            mapped = (base.astype(np.float32) - (c - wd / 2)) * (255.0 / wd)
            out.append(("window", np.clip(mapped, 0, 255).astype(np.uint8)))
        else:
            out.append(("window", to_uint8(frame, frames,
                                           (center + shift * width, width * stretch))))
    for scale in (0.5, 0.75):
        small = Image.fromarray(base).resize((max(8, int(w * scale)), max(8, int(h * scale))),
                                             Image.Resampling.BILINEAR)
        out.append(("resample", np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))))
    return out


def _embed(displays: list[np.ndarray]) -> np.ndarray:
    from dicomlake.udfs import model as model_mod
    from dicomlake.udfs.pixels import resize

    embedder = model_mod.get_embedder(threads=2)
    batches = [embedder.embed(np.stack([resize(d) for d in displays[i:i + 32]]))
               for i in range(0, len(displays), 32)]
    return np.concatenate(batches)


def neighbours(vectors: np.ndarray, queries: np.ndarray, *, m: int, refine: int
                ) -> tuple[np.ndarray, int]:
    """Rows of the ``K`` nearest neighbours of each query row (itself excluded), found as
    ``image_knn`` finds them: PQ codes, ADC scan, exact re-rank; and the codebook's ksub."""
    from dicomlake.udfs import pq
    from dicomlake.udfs.search import CodeIndex
    from dicomlake.udfs.search import refine as refine_rows

    book = pq.train(vectors, m=m)
    codes, lists = book.encode(vectors)
    n = len(vectors)
    index = CodeIndex.build(book, np.array([str(i) for i in range(n)], dtype=object),
                            np.zeros(n, np.int32), codes, lists)
    exact_rows = np.arange(n, dtype=np.int64)  # index order == input order (one list)
    out = np.empty((len(queries), K), dtype=np.int64)
    for q, i in enumerate(queries.tolist()):
        rows, dist = index.search(vectors[i], max(K + 1, refine))
        rows, _ = refine_rows(rows, dist, vectors[i], vectors, exact_rows)
        out[q] = [r for r in rows.tolist() if r != i][:K]
    return out, book.ksub


def run(*, bases: int = 60, m: int = 32, refine: int = 100, seed: int = 3) -> dict[str, Any]:
    """Run both tasks and return their keys (see the module docstring)."""
    images = shipped_images()
    groups = perceptual_groups(images)
    rng = np.random.default_rng(seed)

    displays: list[np.ndarray] = []
    labels: list[int] = []
    kinds: list[str] = []
    originals: dict[int, int] = {}  # group -> row of its unaltered picture
    for g, members in enumerate(groups[:bases]):
        image = images[representative(images, members)]
        originals[g] = len(displays)
        displays.append(image.display())
        labels.append(g)
        kinds.append("original")
        for kind, variant in _variants(image, rng):
            displays.append(variant)
            labels.append(g)
            kinds.append(kind)
    vectors = _embed(displays)
    n = len(vectors)
    top, ksub = neighbours(vectors, np.arange(n), m=m, refine=refine)
    group_arr, kind_arr = np.array(labels), np.array(kinds)
    precision = (group_arr[top] == group_arr[:, np.newaxis]).mean(axis=1)

    objects = membership_objects(images, groups)
    if not objects:
        raise RuntimeError(f"bench retrieval: no shipped multi-frame instance or series has "
                           f">= {MIN_OBJECT_FRAMES} frames; reinstall the pinned pydicom-data")
    frames = [f for obj in objects for f in obj.frames]
    in_objects = frozenset().union(*(obj.groups for obj in objects))
    distractor_rows = [row for g, row in originals.items() if g not in in_objects]
    query_owner = np.array([o for o, obj in enumerate(objects) for _ in obj.frames])
    owner = np.concatenate([query_owner, np.full(len(distractor_rows), -1)])
    member_vectors = np.concatenate([_embed(frames), vectors[distractor_rows]])
    member_top, _ = neighbours(member_vectors, np.arange(len(frames)), m=m, refine=refine)
    hits = (owner[member_top] == query_owner[:, np.newaxis]).sum(axis=1)
    sizes = np.array([len(objects[o].frames) for o in query_owner])
    frame_precision = hits / np.minimum(K, sizes - 1)
    by_object = {obj.name: float(frame_precision[query_owner == o].mean())
                 for o, obj in enumerate(objects)}
    return {
        "precision_at_10": float(precision.mean()),
        "precision_at_10_by_kind": {kind: float(precision[kind_arr == kind].mean())
                                    for kind in KINDS},
        "queries": n,
        "groups": len(originals),
        "raw_images": len(images),
        "perceptual_groups": len(groups),
        "variants_per_image": 10,
        "membership_precision_at_10": float(np.mean(list(by_object.values()))),
        "membership_precision_at_10_by_object": by_object,
        "membership_objects": len(objects),
        "membership_series": sum(obj.kind == "series" for obj in objects),
        "membership_frames": len(frames),
        "membership_distractors": len(distractor_rows),
        "m": m,
        "ksub": ksub,
        "refine": refine,
    }
