"""The retrieval benchmark measures what it claims: lossy copies of one picture are one group,
distinct pictures stay apart, membership objects are real multi-frame sequences, and a query
never counts itself."""

from __future__ import annotations

import numpy as np
import pytest

from dicomlake.bench import retrieval
from dicomlake.udfs.pixels import Frames


@pytest.fixture(scope="module")
def shipped() -> tuple[list[retrieval.ShippedImage], list[list[int]]]:
    images = retrieval.shipped_images()
    return images, retrieval.perceptual_groups(images)


def _group_of(shipped, name: str) -> int:
    images, groups = shipped
    rows = [i for i, image in enumerate(images) if image.name == name]
    assert rows, f"{name} is not among the shipped images"
    return next(g for g, members in enumerate(groups) if rows[0] in members)


@pytest.mark.parametrize("twins", [
    # the same MR in six transfer syntaxes (lossless: RLE, JPEG-LS, J2K, big endian)
    ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
     "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"),
    # one RGB picture: RLE, 16-bit, lossless JPEG, lossy dcmtk JPEG
    ("SC_rgb.dcm", "SC_rgb_rle.dcm", "SC_rgb_16bit.dcm", "SC_rgb_jpeg_gdcm.dcm",
     "SC_rgb_dcmtk_+eb+cy+n1.dcm"),
    # lossy 12-bit JPEG and lossy JPEG 2000 of the uncompressed NM image
    ("JPEG2000_UNC.dcm", "JPGExtended.dcm", "JPEG2000.dcm", "JPEG-LL.dcm"),
    ("MR2_UNCI.dcm", "MR2_J2KI.dcm", "MR2_J2KR.dcm"),
    # 30 frames of the 120-frame cine, re-encoded at half size
    ("color3d_jpeg_baseline.dcm", "examples_ybr_color.dcm"),
])
def test_lossy_twins_are_one_group(shipped, twins) -> None:
    assert len({_group_of(shipped, name) for name in twins}) == 1


@pytest.mark.parametrize("pair", [
    ("693_UNCI.dcm", "693_UNCR.dcm"),  # adjacent CT slices: the closest distinct pictures
    ("MR_small.dcm", "emri_small.dcm"),
    ("SC_rgb.dcm", "US1_UNCI.dcm"),
    ("examples_palette.dcm", "OBXXXX1A.dcm"),  # same SOP UID, different pixels
])
def test_distinct_pictures_stay_apart(shipped, pair) -> None:
    assert _group_of(shipped, pair[0]) != _group_of(shipped, pair[1])


def test_grouping_collapses_the_shipped_copies(shipped) -> None:
    images, groups = shipped
    assert sorted(i for members in groups for i in members) == list(range(len(images)))
    assert len(groups) < len(images) / 2
    nm = groups[_group_of(shipped, "JPEG2000_UNC.dcm")]
    assert not images[retrieval.representative(images, nm)].lossy


def test_signature_ignores_scale_and_rejects_flat_images() -> None:
    rng = np.random.default_rng(0)
    picture = (rng.random((64, 64)) * 255).astype(np.uint8)
    big = np.kron(picture, np.ones((3, 3), np.uint8))  # same picture, 3x the pixels
    other = (rng.random((64, 64)) * 255).astype(np.uint8)
    sig = retrieval.signature(picture)
    assert sig is not None
    assert float(sig @ retrieval.signature(big)) > 0.999
    assert float(sig @ retrieval.signature(other)) < retrieval.TWIN_CORRELATION
    assert retrieval.signature(np.full((64, 64), 7, np.uint8)) is None


def test_membership_objects_are_long_sequences(shipped) -> None:
    images, groups = shipped
    objects = retrieval.membership_objects(images, groups)
    names = {obj.name for obj in objects}
    assert {"emri_small.dcm", "color3d_jpeg_baseline.dcm"} <= names
    assert "examples_ybr_color.dcm" not in names  # a copy of the cine's first 30 frames
    for obj in objects:
        assert len(obj.frames) >= retrieval.MIN_OBJECT_FRAMES
    claimed = [g for obj in objects for g in obj.groups]
    assert len(claimed) == len(set(claimed))


def _image(series: str, pixels: np.ndarray) -> retrieval.ShippedImage:
    frames = Frames(pixels[np.newaxis].astype(np.float32), False, "CT", (128.0, 256.0), False)
    sig = retrieval.signature(pixels)
    assert sig is not None
    return retrieval.ShippedImage(f"/{series}/{len(pixels)}", frames, 1, False,
                                  ("study", series, "CT", 64, 64), sig)


def test_a_series_of_distinct_pictures_is_an_object() -> None:
    rng = np.random.default_rng(1)
    distinct = [(rng.random((64, 64)) * 255).astype(np.uint8) for _ in range(15)]
    images = [_image("long", p) for p in distinct[:8]]
    images.append(_image("long", distinct[0]))  # a second copy adds no picture
    images += [_image("short", p) for p in distinct[8:]]
    groups = retrieval.perceptual_groups(images)
    assert len(groups) == 15
    objects = retrieval.membership_objects(images, groups)
    assert [(obj.name, obj.kind, len(obj.frames)) for obj in objects] == [
        ("series long", "series", 8)]


def test_neighbours_exclude_the_query_itself() -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 10, (4, 64)).astype(np.float32)
    vectors = np.concatenate([c + rng.normal(0, 0.1, (20, 64)).astype(np.float32)
                              for c in centres])
    vectors[1] = vectors[0]  # an exact twin is a neighbour; the query is not
    top, _ = retrieval.neighbours(vectors, np.arange(len(vectors)), m=8, refine=40)
    assert top.shape == (80, retrieval.K)
    assert all(i not in row for i, row in enumerate(top.tolist()))
    assert top[0, 0] == 1
    assert (top // 20 == (np.arange(80) // 20)[:, np.newaxis]).all()


def test_run_reports_both_tasks() -> None:
    result = retrieval.run(bases=6, m=16, refine=40)
    assert result["groups"] == 6 and result["queries"] == 66
    assert result["raw_images"] > result["perceptual_groups"] >= 6
    assert result["membership_objects"] >= 2 and result["membership_frames"] >= 16
    shares = [result["precision_at_10"], result["membership_precision_at_10"],
              *result["precision_at_10_by_kind"].values(),
              *result["membership_precision_at_10_by_object"].values()]
    assert set(result["precision_at_10_by_kind"]) == set(retrieval.KINDS)
    assert all(0.0 <= v <= 1.0 for v in shares)
