"""The bundled OHIF viewer: served by `dicomlake serve` at /viewer/ and opened from JupyterLab.

Fast tests drive :class:`ViewerSite` on small folders (config, fallback, path traversal,
content types, the mount rewrites) and check the installed OHIF build still has what those
rewrites expect. The slow ones open the real OHIF build in Debian's Chromium against a real
`dicomlake serve` (the lake and servers the extension tests share): the study list, a 512x512
CT series rendered and scrolled, then the same series from the dataset browser's "Open in
viewer" inside a JupyterLab panel. Screenshots go to ``test-artifacts/viewer/``.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import urllib.parse
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageStat

from dicomlake.dicomnet.viewer import VIEWER_DIR, ViewerSite, app_config

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "viewer"
OVERLAY = '[data-cy="viewport-overlay-bottom-right"]'
"""OHIF's corner showing the slice: ``I:13 (1/13)``."""


def _config(body: bytes) -> dict:
    text = body.decode()
    match = re.search(r"window\.config = (\{.*\});\s*$", text, re.S)
    assert match, text[:300]
    return json.loads(match.group(1))


@pytest.fixture
def dist(tmp_path) -> Path:
    """A tiny stand-in for OHIF's dist/ with the constructs the real one has."""
    root = tmp_path / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text(
        '<html><head><script>window.PUBLIC_URL="/"</script>'
        '<link rel="manifest" href="/manifest.json"><script src="/app-config.js"></script>'
        '<script defer src="/app.bundle.0123456789abcdef.js"></script>'
        '<a href="//cdn.example/x">x</a></head></html>')
    (root / "app.bundle.0123456789abcdef.js").write_text(
        'x();\n__webpack_require__.p = "/";\ny();')
    (root / "app-config.js").write_text("window.config = {dataSources: ['someone else']};")
    (root / "app.bundle.css").write_text("@font-face{src:url(/a34f9d1faa5f3315.woff2)}")
    (root / "0ddf166f7a343eda.wasm").write_bytes(b"\0asm\1\0\0\0")
    (root / "a34f9d1faa5f3315.woff2").write_bytes(b"wOF2")
    (root / "manifest.json").write_text("{}")
    (root / "assets" / "favicon.ico").write_bytes(b"\0\0\1\0")
    (tmp_path / "secret.py").write_text("PASSWORD = 'outside the viewer'")
    (root / "escape.txt").symlink_to(tmp_path / "secret.py")
    return root


def test_app_config_points_ohif_at_our_dicomweb():
    config = _config(app_config("/viewer/", "https://lake.example:8443/dicomweb"))
    assert config["routerBasename"] == "/viewer"
    assert config["showStudyList"] is True
    (source,) = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    assert config["defaultDataSourceName"] == source["sourceName"]
    settings = source["configuration"]
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert settings[root] == "https://lake.example:8443/dicomweb"
    assert settings["imageRendering"] == "wadors"
    assert settings["thumbnailRendering"] == "thumbnail"
    assert settings["supportsFuzzyMatching"] is True
    assert settings["qidoSupportsIncludeField"] is True
    assert settings["staticWado"] is False
    # no first-visit tour or dialog covers the study list or the first image
    assert config["customizationService"]["ohif.tours"] == {"$set": []}
    assert config["investigationalUseDialog"] == {"option": "never"}


def test_app_config_is_generated_not_the_packaged_one(dist):
    response = ViewerSite("/viewer/", "http://127.0.0.1:1/dicomweb", dist).respond(
        "app-config.js")
    assert response.status == 200 and response.content_type.startswith("text/javascript")
    assert b"someone else" not in response.body
    assert _config(response.body)["dataSources"][0]["configuration"]["qidoRoot"] == \
        "http://127.0.0.1:1/dicomweb"
    assert ("Cache-Control", "no-cache") in response.headers


def test_routes_fall_back_to_index_rewritten_for_the_mount(dist):
    site = ViewerSite("/lab/dicomlake/viewer/", "http://h/dicomweb", dist)
    for path in ("", "viewer", "viewer?StudyInstanceUIDs=1.2.3", "viewer/dicomweb",
                 "index.html"):
        response = site.respond(path)
        assert response.status == 200 and response.content_type.startswith("text/html")
        html = response.body.decode()
        assert 'window.PUBLIC_URL="/lab/dicomlake/viewer/"' in html
        assert 'src="/lab/dicomlake/viewer/app-config.js"' in html
        assert 'src="/lab/dicomlake/viewer/app.bundle.0123456789abcdef.js"' in html
        assert 'href="/lab/dicomlake/viewer/manifest.json"' in html
        assert 'href="//cdn.example/x"' in html  # protocol-relative URLs are not paths
    missing = site.respond("4711.bundle.0123456789abcdef.js")
    assert missing.status == 404


def test_no_path_leaves_the_viewer_folder(dist):
    site = ViewerSite("/viewer/", "http://h/dicomweb", dist)
    for path in ("../secret.py", "%2e%2e/secret.py", "..%2fsecret.py", "assets/../../secret.py",
                 "/../secret.py", f"{dist.parent}/secret.py", "escape.txt",
                 "%00index.html"):
        response = site.respond(path)
        assert b"outside the viewer" not in response.body, path
        assert response.status == 404, path


def test_files_have_their_types_and_mounted_chunk_paths(dist):
    site = ViewerSite("/viewer/", "http://h/dicomweb", dist)
    wasm = site.respond("0ddf166f7a343eda.wasm")
    assert (wasm.status, wasm.content_type, wasm.body) == (200, "application/wasm",
                                                           b"\0asm\1\0\0\0")
    assert ("Cache-Control", "public, max-age=31536000, immutable") in wasm.headers
    assert site.respond("a34f9d1faa5f3315.woff2").content_type == "font/woff2"
    assert site.respond("manifest.json").content_type == "application/json"
    assert site.respond("assets/favicon.ico").content_type == "image/x-icon"
    css = site.respond("app.bundle.css")
    assert css.content_type.startswith("text/css")
    assert css.body == b"@font-face{src:url(./a34f9d1faa5f3315.woff2)}"
    bundle = site.respond("app.bundle.0123456789abcdef.js")
    assert bundle.content_type.startswith("text/javascript")
    assert b'__webpack_require__.p = "/"' not in bundle.body
    assert b"self.PUBLIC_URL" in bundle.body and bundle.body.startswith(b"x();")
    with pytest.raises(ValueError, match="must be a path"):
        ViewerSite("viewer", "http://h/dicomweb", dist)


def test_the_installed_ohif_build_has_what_the_rewrites_expect():
    """An OHIF upgrade that renamed these would break the mount silently."""
    assert (VIEWER_DIR / "index.html").is_file(), "OHIF is not installed: run `make install`"
    html = (VIEWER_DIR / "index.html").read_text()
    assert 'window.PUBLIC_URL="/"' in html and 'src="/app-config.js"' in html
    (bundle,) = VIEWER_DIR.glob("app.bundle.*.js")
    assert b'__webpack_require__.p = "/";' in bundle.read_bytes()
    assert not list(VIEWER_DIR.rglob("*.map"))
    body = ViewerSite("/viewer/", "http://h/dicomweb").respond("viewer").body
    assert b'src="/viewer/' + bundle.name.encode() in body


# -- the real thing ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_series(servers) -> dict:
    """The lake's 512x512 CT series with the most images (and its study)."""
    from deltalake import DeltaTable

    table = DeltaTable(str(servers.home / "warehouse" / "dicom" / "instances"))
    rows = table.to_pyarrow_table(columns=[
        "study_instance_uid", "series_instance_uid", "modality", "rows", "columns",
        "accession_number", "study_description"]).to_pylist()
    counts: dict[str, list[dict]] = {}
    for row in rows:
        if row["modality"] == "CT" and row["rows"] == row["columns"] == 512:
            counts.setdefault(row["series_instance_uid"], []).append(row)
    best = max(counts.values(), key=len)
    assert len(best) >= 2, "the sample lake needs a CT series of two images or more"
    studies = {r["study_instance_uid"] for r in rows}
    return {**best[0], "images": len(best), "studies": len(studies),
            # images uploaded by earlier test modules (same lab lake) have none
            "accessions": {r["accession_number"] for r in rows if r["accession_number"]}}


def _not_blank(png: bytes) -> float:
    """The grey-level spread of a screenshot (0 for a uniform picture)."""
    stat = ImageStat.Stat(Image.open(io.BytesIO(png)).convert("L"))
    return stat.stddev[0]


def _wait_for_first_slice(frame, images: int) -> None:
    frame.locator(OVERLAY).filter(has_text=f"(1/{images})").wait_for()
    # the first image is drawn once its frame arrived; give the canvas that moment
    frame.locator("canvas.cornerstone-canvas").first.wait_for()


def _scroll_changes_slice(page, frame, images: int, name: str) -> None:
    canvas = frame.locator("canvas.cornerstone-canvas").first
    before = canvas.screenshot()
    assert _not_blank(before) > 10, "the viewport shows no image"
    (ARTIFACTS / f"{name}-first.png").write_bytes(before)
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)
    frame.locator(OVERLAY).filter(has_text=f"(2/{images})").wait_for()
    after = canvas.screenshot()
    assert _not_blank(after) > 10
    (ARTIFACTS / f"{name}-second.png").write_bytes(after)


@pytest.mark.slow
def test_files_are_public_and_dicomweb_asks_for_a_login(servers):
    url = servers.sql_url
    moved = requests.get(f"{url}/viewer", allow_redirects=False, timeout=30)
    assert moved.status_code == 301 and moved.headers["Location"] == "/viewer/"
    page = requests.get(f"{url}/viewer/viewer?StudyInstanceUIDs=1.2.3", timeout=30)
    assert page.status_code == 200 and 'window.PUBLIC_URL="/viewer/"' in page.text
    config = _config(requests.get(f"{url}/viewer/app-config.js", timeout=30).content)
    assert config["dataSources"][0]["configuration"]["qidoRoot"] == f"{url}/dicomweb"
    (wasm,) = list(VIEWER_DIR.glob("*.wasm"))[:1]
    binary = requests.get(f"{url}/viewer/{wasm.name}", timeout=30,
                          headers={"Accept-Encoding": "gzip"})
    assert binary.headers["Content-Type"] == "application/wasm"
    assert "Content-Encoding" not in binary.headers
    assert binary.content == wasm.read_bytes()
    refused = requests.get(f"{url}/dicomweb/studies", timeout=30)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.slow
def test_ohif_lists_our_studies_renders_and_scrolls_a_ct_series(servers, ct_series):
    from _extension_helpers import ADMIN_PASSWORD, ADMIN_USER, chromium_page

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    credentials = {"username": ADMIN_USER, "password": ADMIN_PASSWORD}
    with chromium_page(ARTIFACTS / "console.log", http_credentials=credentials) as page:
        page.goto(f"{servers.sql_url}/viewer/")
        studies = ct_series["studies"]
        page.get_by_text(f"1-{studies} of {studies}").wait_for()
        body = page.inner_text("body")
        assert all(accession in body for accession in ct_series["accessions"])
        page.screenshot(path=str(ARTIFACTS / "01-study-list.png"))
        page.get_by_text(ct_series["accession_number"], exact=True).click()
        page.get_by_role("button", name="Basic Viewer").click()
        _wait_for_first_slice(page, ct_series["images"])
        assert ct_series["study_instance_uid"] in page.url
        page.wait_for_timeout(1500)  # OHIF starts its tour up to ~0.5 s after the viewport
        assert page.locator(".shepherd-element").count() == 0, "an onboarding tour is shown"
        _scroll_changes_slice(page, page, ct_series["images"], "02-ct")
        page.screenshot(path=str(ARTIFACTS / "03-ct-scrolled.png"))


@pytest.mark.slow
def test_jupyter_proxies_dicomweb_as_the_mapped_user(servers, ct_series):
    from _extension_helpers import SQL_PASSWORD, SQL_USER

    direct = requests.get(f"{servers.sql_url}/dicomweb/studies", timeout=30,
                          auth=(SQL_USER, SQL_PASSWORD))
    proxied = requests.get(servers.api("dicomweb/studies"), headers=servers.auth, timeout=30)
    assert proxied.status_code == direct.status_code == 200
    assert proxied.json() == direct.json()
    anonymous = requests.get(servers.api("dicomweb/studies"), timeout=30,
                             allow_redirects=False)
    assert anonymous.status_code in (302, 403)
    study, series = ct_series["study_instance_uid"], ct_series["series_instance_uid"]
    metadata = requests.get(servers.api(f"dicomweb/studies/{study}/series/{series}/metadata"),
                            headers=servers.auth, timeout=30).json()
    sop = metadata[0]["00080018"]["Value"][0]
    frame = requests.get(
        servers.api(f"dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/1"),
        headers={**servers.auth, "Accept-Encoding": "gzip",
                 "Accept": "multipart/related; type=application/octet-stream"}, timeout=30)
    assert frame.status_code == 200
    assert frame.headers["Content-Type"].startswith("multipart/related")
    assert "Content-Encoding" not in frame.headers
    assert len(frame.content) > 512 * 512 * 2
    page = requests.get(servers.api("viewer/viewer"), headers=servers.auth, timeout=30)
    assert 'window.PUBLIC_URL="/dicomlake/viewer/"' in page.text
    # only DICOMweb resources pass: dot segments (sent raw, percent-encoded, so that no client
    # library folds them away) are refused before forwarding; before this rule the proxy
    # forwarded "studies/../series" and the server answered 200 (".." matched as a study UID)
    lab = urllib.parse.urlsplit(servers.lab_url)
    for escape in ("studies/%2E%2E/series", "studies/%2E/series", "%2E%2E/v1/info",
                   f"studies/{study}/series/%2E%2E/metadata", "studies/%2E%2E/%2E%2E/v1/info"):
        connection = http.client.HTTPConnection(lab.hostname, lab.port, timeout=30)
        connection.request("GET", f"{lab.path}/dicomlake/dicomweb/{escape}",
                           headers=servers.auth)
        refused = connection.getresponse()
        refused.read()
        connection.close()
        assert (refused.status, refused.reason) == (404, "not a DICOMweb resource"), escape


@pytest.mark.slow
def test_open_in_viewer_from_the_dataset_browser(servers, ct_series):
    from _extension_helpers import lab_page

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with lab_page(servers, ARTIFACTS / "lab-console.log") as page:
        page.click('.lm-MenuBar-itemLabel:text-is("dicomlake")')
        page.click('.lm-Menu-itemLabel:text-is("Dataset Browser")')
        study = ct_series["study_instance_uid"]
        page.click(f'.jp-DicomlakeBrowser-study[data-uid="{study}"]')
        card = page.locator(
            f'.jp-DicomlakeBrowser-seriesCard[data-uid="{ct_series["series_instance_uid"]}"]')
        page.screenshot(path=str(ARTIFACTS / "10-browser-series.png"))
        card.locator(".jp-DicomlakeBrowser-openViewer").click()
        page.wait_for_selector(".jp-DicomlakeViewer iframe")
        frame = page.frame_locator(".jp-DicomlakeViewer iframe")
        _wait_for_first_slice(frame, ct_series["images"])
        _scroll_changes_slice(page, frame, ct_series["images"], "11-lab-ct")
        page.screenshot(path=str(ARTIFACTS / "12-lab-viewer-panel.png"))
