"""The JupyterLab front end in real headless Chromium (Debian's), driven by Playwright, against
a real ``jupyter lab`` and a real ``dicomlake serve`` on a small embedded lake.

What a user does: open the SQL sidebar, expand the schema tree, run a query and see rows, see
a query error with its position; open the dataset browser, filter by modality, open a study,
a series and an image, click "find similar" and see neighbours ordered by distance. A
screenshot of each step lands in ``test-artifacts/extension/``.
"""

from __future__ import annotations

import json
import re

import pytest
from _extension_helpers import ARTIFACTS, lab_page
from playwright.sync_api import expect

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def page(servers):
    with lab_page(servers, ARTIFACTS / "console.log") as page:
        yield page


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


# The tests below are one user's session, in order.


def test_sidebar_connects_and_tree_expands(page, servers):
    if not page.is_visible("#dicomlake-sql-sidebar"):
        page.click('.jp-SideBar .lm-TabBar-tab[data-id="dicomlake-sql-sidebar"]')
    status = page.wait_for_selector(".jp-DicomlakeSql-status.jp-mod-connected")
    assert "connected as lab" in status.inner_text()
    shot(page, "01-sidebar-connected")
    for path in ("dicomlake", "dicomlake.dicom", "dicomlake.dicom.instances"):
        page.click(f'li[data-path="{path}"] > .jp-DicomlakeTree-row')
        page.wait_for_selector(f'li[data-path="{path}"] > ul > li.jp-DicomlakeTree-node')
    column = page.wait_for_selector('li[data-path="dicomlake.dicom.instances.modality"]')
    assert "varchar" in column.inner_text()
    shot(page, "02-schema-tree")


def test_run_query_shows_rows(page):
    page.click(".jp-DicomlakeSql-run")
    page.wait_for_selector(".jp-DicomlakeSql-table tbody tr")
    headers = page.locator(".jp-DicomlakeSql-table thead th span").all_inner_texts()
    assert headers == ["modality", "images"]
    rows = page.locator(".jp-DicomlakeSql-table tbody tr")
    assert rows.count() >= 2
    assert "CT" in page.locator(".jp-DicomlakeSql-table tbody").inner_text()
    assert re.search(r"\d+ rows in", page.inner_text(".jp-DicomlakeSql-resultInfo"))
    assert "SELECT modality" in page.text_content(".jp-DicomlakeSql-history")
    shot(page, "03-query-rows")


def test_query_error_is_shown_with_position(page):
    editor = page.locator(".jp-DicomlakeSql-editor .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("SELECT modality, nope\nFROM dicom.instances")
    page.keyboard.press("Escape")  # close the completion popup if it opened
    page.click(".jp-DicomlakeSql-run")
    error = page.wait_for_selector(".jp-DicomlakeSql-error:not([hidden])")
    text = error.inner_text()
    assert "COLUMN_NOT_FOUND at line 1, column 18" in text and "nope" in text
    assert page.inner_text(".jp-DicomlakeSql-errorMark") == "nope"
    shot(page, "04-query-error")


def test_insert_column_name_from_tree(page):
    editor = page.locator(".jp-DicomlakeSql-editor .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("SELECT ")
    page.keyboard.press("Escape")
    page.dblclick('li[data-path="dicomlake.dicom.instances.body_part_examined"] '
                  "> .jp-DicomlakeTree-row")
    assert "SELECT body_part_examined" in editor.inner_text()


# CodeMirror ignores Enter on a completion list for its `interactionDelay` (75 ms by
# default) after the list opens, so that a fast typist does not accept by accident; a test
# that presses Enter the instant the list shows gets a newline instead (seen in CI).
COMPLETION_INTERACTION_DELAY_MS = 75


def accept_completion(page, label: str) -> None:
    """Wait for `label` in the completion list, then accept it as a user would."""
    page.wait_for_selector(f".cm-tooltip-autocomplete li:has-text('{label}')")
    page.wait_for_timeout(3 * COMPLETION_INTERACTION_DELAY_MS)
    page.keyboard.press("Enter")
    page.wait_for_selector(".cm-tooltip-autocomplete", state="detached")


def test_editor_completes_table_and_column_names(page):
    editor = page.locator(".jp-DicomlakeSql-editor .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("SELECT * FROM dicom.stu")
    accept_completion(page, "studies")
    page.keyboard.type(" WHERE patient_na")
    page.wait_for_selector(".cm-tooltip-autocomplete li:has-text('patient_name')")
    shot(page, "04b-completion")
    accept_completion(page, "patient_name")
    assert editor.inner_text() == "SELECT * FROM dicom.studies WHERE patient_name"


def test_browser_filters_by_modality(page):
    page.click('.lm-MenuBar-itemLabel:text-is("dicomlake")')
    page.click('.lm-Menu-itemLabel:text-is("Dataset Browser")')
    page.wait_for_selector(".jp-DicomlakeBrowser-study")
    shot(page, "05-browser")
    page.wait_for_selector('.jp-DicomlakeBrowser-modality option[value="CT"]', state="attached")
    page.select_option(".jp-DicomlakeBrowser-modality", "CT")
    page.wait_for_selector(".jp-DicomlakeBrowser-sqlLog li:first-child pre:has-text(\"'CT'\")")
    page.wait_for_selector(".jp-DicomlakeBrowser-study")
    modalities = page.locator(".jp-DicomlakeBrowser-study td:nth-child(4)").all_inner_texts()
    assert modalities and all("CT" in m for m in modalities)
    shot(page, "06-browser-filtered-ct")


def test_open_study_series_and_image(page):
    page.click(".jp-DicomlakeBrowser-study >> nth=0")
    page.click(".jp-DicomlakeBrowser-seriesCard >> nth=0")
    page.wait_for_selector(".jp-DicomlakeBrowser-instanceCard img")
    loaded = page.eval_on_selector_all(
        ".jp-DicomlakeBrowser-instanceCard img", "imgs => imgs.map(i => i.naturalWidth)")
    assert loaded and all(width > 0 for width in loaded)
    shot(page, "07-series-and-images")
    page.click(".jp-DicomlakeBrowser-instanceCard >> nth=0")
    page.wait_for_selector(".jp-DicomlakeBrowser-findSimilar")
    assert "sop_instance_uid" in page.inner_text(".jp-DicomlakeBrowser-fields")
    shot(page, "08-image-detail")


def test_find_similar_shows_ordered_thumbnails(page):
    selected = page.get_attribute(".jp-DicomlakeBrowser-detailHead", "data-uid")
    page.click(".jp-DicomlakeBrowser-findSimilar")
    page.wait_for_selector(".jp-DicomlakeBrowser-neighbour img")
    cards = page.locator(".jp-DicomlakeBrowser-neighbour")
    ranks = [int(r) for r in cards.evaluate_all("cs => cs.map(c => c.dataset.rank)")]
    distances = [float(d) for d in cards.evaluate_all("cs => cs.map(c => c.dataset.distance)")]
    uids = cards.evaluate_all("cs => cs.map(c => c.dataset.uid)")
    assert len(ranks) == 12 and ranks == sorted(ranks) and ranks[0] == 1
    assert distances == sorted(distances)
    assert distances[0] == pytest.approx(0.0, abs=1e-3)
    # the image itself is among the nearest (the sample repeats some images exactly)
    assert selected in [u for u, d in zip(uids, distances, strict=True) if d < 1e-3]
    assert "image_knn(query =>" in page.inner_text(".jp-DicomlakeBrowser-sqlLog li:first-child")
    page.locator(".jp-DicomlakeBrowser-similar").scroll_into_view_if_needed()
    shot(page, "09-find-similar")


def test_upload_adds_an_image(page, tmp_path):
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from dicomlake.catalog.sample import find_template

    ds = dcmread(find_template("MR_small.dcm"))
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.SeriesInstanceUID, ds.StudyDescription = generate_uid(), "UPLOADED FROM THE BROWSER"
    upload = tmp_path / "uploaded.dcm"
    ds.save_as(upload)
    page.set_input_files(".jp-DicomlakeBrowser-file", str(upload))
    message = page.wait_for_selector(
        ".jp-DicomlakeBrowser-message:has-text('upload ingested')", timeout=900_000)
    assert "1 images written" in message.inner_text()
    assert "upload: what arrived" in page.inner_text(".jp-DicomlakeBrowser-sqlLog")
    page.select_option(".jp-DicomlakeBrowser-modality", "")
    page.fill(".jp-DicomlakeBrowser-text", "uploaded from the browser")
    page.click(".jp-DicomlakeBrowser-apply")
    page.wait_for_selector(".jp-DicomlakeBrowser-sqlLog li:first-child "
                           "pre:has-text('%uploaded from the browser%')")
    studies = page.locator(".jp-DicomlakeBrowser-study")
    expect(studies).to_have_count(1)
    assert "UPLOADED FROM THE BROWSER" in studies.inner_text()
    shot(page, "10-upload")


def test_browse_from_a_notebook(page, servers):
    notebook = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {},
                           "outputs": [], "source": ["import dicomlake\n",
                                                    'dicomlake.browse(modality="MR")']}],
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                            "language": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    (servers.notebooks / "browse.ipynb").write_text(json.dumps(notebook))
    page.goto(f"{servers.lab_url}/lab/tree/browse.ipynb?token={servers.token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content")
    page.wait_for_selector(".jp-StatusBar-TextItem:has-text('| Idle')")
    page.click('.lm-MenuBar-itemLabel:text-is("Run")')
    page.click('.lm-Menu-itemLabel:text-is("Run All Cells")')
    output = page.wait_for_selector(".jp-OutputArea .jp-DicomlakeBrowser-study")
    assert output is not None
    assert page.input_value(".jp-OutputArea .jp-DicomlakeBrowser-modality") == "MR"
    modalities = page.locator(
        ".jp-OutputArea .jp-DicomlakeBrowser-study td:nth-child(4)").all_inner_texts()
    assert modalities and all("MR" in m for m in modalities)
    shot(page, "11-notebook-browse")
