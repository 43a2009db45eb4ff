"""Search by an image that is not in the lake, from the dataset browser: the Jupyter route
``image-search`` over HTTP (PNG, DICOM too large for one statement, garbage) and the
"Search by image" file picker in real headless Chromium (Debian's), against a real
``jupyter lab`` and ``dicomlake serve`` on a small embedded lake. The picked file is never
saved on the server; screenshots land in ``test-artifacts/extension/``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from _extension_helpers import ADMIN_PASSWORD, ADMIN_USER, ARTIFACTS, lab_page
from _knn_helpers import is_source
from _sql_helpers import connect
from PIL import Image

from dicomlake.udfs.pixels import load_frames, read_bytes, to_uint8

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def lake_paths(servers) -> dict[str, str]:
    """SOPInstanceUID -> path of every embedded instance (asked as the lake's admin)."""
    cursor = connect(servers.sql_url, ADMIN_USER, ADMIN_PASSWORD, schema="dicom").cursor()
    cursor.execute("SELECT DISTINCT i.sop_instance_uid, i.path FROM instances i "
                   "JOIN embeddings e ON e.sop_instance_uid = i.sop_instance_uid")
    return dict(cursor.fetchall())


@pytest.fixture(scope="module")
def a_ct_path(servers) -> str:
    cursor = connect(servers.sql_url, ADMIN_USER, ADMIN_PASSWORD, schema="dicom").cursor()
    cursor.execute("SELECT path FROM instances WHERE modality = 'CT' AND rows = 512 "
                   "ORDER BY path LIMIT 1")
    return cursor.fetchall()[0][0]


def _augmented_png(path: str) -> bytes:
    """The lake image as a viewer would export it, shifted 3 pixels, with noise."""
    frames = load_frames(read_bytes(path), path)
    image = np.roll(to_uint8(frames.data[0], frames).astype(np.int16), 3, axis=1)
    noisy = image + np.random.default_rng(5).normal(0, 6, image.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _search(servers, name: str, data: bytes, k: int = 5) -> requests.Response:
    return requests.post(servers.api("image-search"), headers=servers.auth,
                         files={"image": (name, data)}, data={"k": str(k)}, timeout=600)


def _uploads(servers) -> set[str]:
    folder = servers.home / "uploads"
    return {str(p) for p in folder.rglob("*")} if folder.exists() else set()


def test_png_search_answers_neighbours_and_keeps_no_file(servers, lake_paths, a_ct_path):
    png = _augmented_png(a_ct_path)
    before = _uploads(servers)
    response = _search(servers, "export.png", png)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["error"] is None
    assert [r["rank"] for r in doc["records"]] == [1, 2, 3, 4, 5]
    assert all(r["thumbnail"] for r in doc["records"])
    assert any(is_source(a_ct_path, lake_paths[r["sop_instance_uid"]])
               for r in doc["records"][:3])
    assert doc["queryImage"]["bytes"] == len(png) and doc["queryImage"]["sent"] == "as uploaded"
    # the browser shows the statement with the image cut to its first bytes
    assert "image_knn(query_image => X'89504E470D0A1A0A...', k => 5)" in doc["sql"]
    assert png.hex().upper() not in doc["sql"] and doc["queryImage"]["sha256"] in doc["sql"]
    assert _uploads(servers) == before


def test_dicom_too_large_for_one_statement_is_sent_as_its_frame(servers, lake_paths,
                                                                   a_ct_path):
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    ds = dcmread(io.BytesIO(read_bytes(a_ct_path)))
    big = np.kron(ds.pixel_array, np.ones((2, 2), dtype=ds.pixel_array.dtype))  # 1024 px
    ds.Rows, ds.Columns, ds.PixelData = big.shape[0], big.shape[1], big.tobytes()
    ds.SOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf)
    assert buf.tell() > 1 << 20
    response = _search(servers, "big.dcm", buf.getvalue(), k=3)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["queryImage"]["sent"] == "frame 0 as PNG" and doc["error"] is None
    assert is_source(a_ct_path, lake_paths[doc["records"][0]["sop_instance_uid"]])


def test_garbage_is_refused_naming_its_first_bytes(servers):
    response = _search(servers, "notes.txt", b"hello, not an image")
    assert response.status_code == 200
    error = response.json()["error"]
    assert "query_image is neither DICOM, PNG nor JPEG: starts with 68 65 6c 6c 6f" \
        in error["message"]
    missing = requests.post(servers.api("image-search"), headers=servers.auth,
                            data={"k": "3"}, timeout=60)
    assert missing.status_code == 400 and "multipart field 'image'" in missing.text
    bad_k = _search(servers, "x.png", b"\x89PNG", k=0)
    assert bad_k.status_code == 400 and "k must be between 1 and 100" in bad_k.text


@pytest.fixture(scope="module")
def page(servers):
    with lab_page(servers) as page:
        yield page


def test_browser_search_by_image_shows_neighbours(page, servers, lake_paths, a_ct_path,
                                                  tmp_path):
    png = tmp_path / "my export.png"
    png.write_bytes(_augmented_png(a_ct_path))
    before = _uploads(servers)
    page.click('.lm-MenuBar-itemLabel:text-is("dicomlake")')
    page.click('.lm-Menu-itemLabel:text-is("Dataset Browser")')
    page.wait_for_selector(".jp-DicomlakeBrowser-study")
    with page.expect_file_chooser() as chooser:
        page.click(".jp-DicomlakeBrowser-searchByImage")
    chooser.value.set_files(str(png))
    page.wait_for_selector(".jp-DicomlakeBrowser-neighbour img")
    cards = page.locator(".jp-DicomlakeBrowser-neighbour")
    ranks = [int(r) for r in cards.evaluate_all("cs => cs.map(c => c.dataset.rank)")]
    distances = [float(d) for d in cards.evaluate_all("cs => cs.map(c => c.dataset.distance)")]
    uids = cards.evaluate_all("cs => cs.map(c => c.dataset.uid)")
    assert len(ranks) == 12 and ranks == sorted(ranks) and ranks[0] == 1
    assert distances == sorted(distances)
    assert any(is_source(a_ct_path, lake_paths[uid]) for uid in uids[:3])
    loaded = page.eval_on_selector_all(".jp-DicomlakeBrowser-neighbour img",
                                       "imgs => imgs.map(i => i.naturalWidth)")
    assert loaded and all(width > 0 for width in loaded)
    assert "my export.png" in page.inner_text(".jp-DicomlakeBrowser-queryImage")
    assert "not stored" in page.inner_text(".jp-DicomlakeBrowser-queryImage")
    logged = page.inner_text(".jp-DicomlakeBrowser-sqlLog li:first-child")
    assert "search by image" in logged and "image_knn(query_image => X'89504E47" in logged
    page.locator(".jp-DicomlakeBrowser-similar").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "12-search-by-image.png"))
    # a neighbour opens like any image
    cards.first.click()
    page.wait_for_selector(f'.jp-DicomlakeBrowser-detailHead[data-uid="{uids[0]}"]')
    assert _uploads(servers) == before
