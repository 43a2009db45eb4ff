"""Results people can look at: the SQL sidebar's "Open in tab" grid (sort, resize, select and
copy, CSV download), its Vega-Lite chart and "Open in notebook", in real headless Chromium
(Debian's) against a real ``jupyter lab`` and ``dicomlake serve`` on a small embedded lake;
and ``dicomlake.sql.notebook.query``, the cell's Python client, against the same endpoint.
Screenshots and the downloaded CSV land in ``test-artifacts/extension/``."""

from __future__ import annotations

import csv
import io

import pytest
from _extension_helpers import (
    ARTIFACTS,
    SQL_PASSWORD,
    SQL_USER,
    chromium_page,
)
from _sql_helpers import connect

pytestmark = pytest.mark.slow

COLUMNS = ["path", "modality", "member_index", "file_size"]
SORTED = COLUMNS.index("member_index")
"""The column the tests sort by: its values (0..19 per archive) sort differently as text."""
SIDEBAR_PAGE = 50
"""Rows one sidebar page shows (sidebar.ts PAGE_SIZE)."""


@pytest.fixture(scope="module")
def sql(sample_archives) -> str:
    """One line (typing a newline into the editor could accept a completion instead), over
    the sample archives' rows only: earlier modules upload into the shared lab lake, and an
    upload's ingest may land while this module runs (uploads sort first by path), which
    would change the rows between the fixture's query and the browser's."""
    folder = str(sample_archives[0].parent).replace("'", "''")
    return ("SELECT path, modality, member_index, file_size FROM dicom.instances "
            f"WHERE path LIKE '{folder}/%' ORDER BY path")


@pytest.fixture(scope="module")
def expected(servers, sql) -> list[list]:
    """The statement's rows as the sidebar's SQL user gets them from the endpoint."""
    cursor = connect(servers.sql_url, SQL_USER, SQL_PASSWORD, schema="dicom").cursor()
    cursor.execute(sql)
    rows = [list(r) for r in cursor.fetchall()]
    # the grid is only needed past one sidebar page, and numeric sorting is only proven by
    # values whose text order differs (9 < 10 as numbers, "10" < "9" as text)
    assert len(rows) > SIDEBAR_PAGE
    values = {r[SORTED] for r in rows if r[SORTED] is not None}
    assert sorted(values) != sorted(values, key=str), values
    return rows


def by_sorted_descending(rows: list[list]) -> list[list]:
    """The grid's descending sort of `rows`: NULLs last, ties in the statement's order."""
    return sorted(rows, key=lambda r: (r[SORTED] is None, -(r[SORTED] or 0)))


def as_text(value) -> str:
    return "NULL" if value is None else str(value)


@pytest.fixture(scope="module")
def page(servers):
    console = ARTIFACTS / "results-console.log"
    with chromium_page(console, permissions=["clipboard-read", "clipboard-write"]) as page:
        page.goto(f"{servers.lab_url}/lab?reset&token={servers.token}")
        page.wait_for_selector("#jp-main-dock-panel")
        yield page


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def grid_rows(page) -> list[list[str]]:
    """The data cells of the rows the grid has drawn, top to bottom."""
    return page.locator(".jp-DicomlakeResults-grid tbody tr[data-row]").evaluate_all(
        "rows => rows.map(r => Array.from(r.cells).slice(1).map(c => c.textContent))")


# The tests below are one user's session, in order.


def test_query_helper_returns_the_rows(servers, expected, sql, monkeypatch):
    """What the notebook cell calls, run here against the same servers and identities."""
    from dicomlake.sql.notebook import query

    monkeypatch.setenv("DICOMLAKE_JUPYTER_IDENTITIES", str(servers.identities))
    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
    frame = query(sql)
    assert list(frame.columns) == COLUMNS
    assert frame.astype(object).where(frame.notna(), None).values.tolist() == expected


def test_open_in_tab_is_prominent_for_a_large_result(page, expected, sql):
    if not page.is_visible("#dicomlake-sql-sidebar"):
        page.click('.jp-SideBar .lm-TabBar-tab[data-id="dicomlake-sql-sidebar"]')
    page.wait_for_selector(".jp-DicomlakeSql-status.jp-mod-connected")
    editor = page.locator(".jp-DicomlakeSql-editor .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    # pasted in one piece: typed key by key on a loaded machine, the completion popup could
    # take part of the statement (the clean-clone run timed out here once)
    page.evaluate("text => navigator.clipboard.writeText(text)", sql)
    page.keyboard.press("Control+V")
    page.keyboard.press("Escape")  # close the completion popup if it opened
    assert editor.inner_text() == sql
    page.click(".jp-DicomlakeSql-run")
    page.wait_for_selector(".jp-DicomlakeSql-resultActions:not([hidden]), "
                           ".jp-DicomlakeSql-error:not([hidden])")
    assert not page.is_visible(".jp-DicomlakeSql-error"), \
        page.inner_text(".jp-DicomlakeSql-error")
    button = page.locator(".jp-DicomlakeSql-openTab")
    assert "jp-mod-accept" in button.get_attribute("class")
    assert f"All {len(expected)} rows" in button.get_attribute("title")
    shot(page, "20-results-sidebar")
    button.click()
    page.wait_for_selector(".jp-DicomlakeResults-grid tbody tr[data-row]")
    assert page.inner_text(".jp-DicomlakeResults-info") == f"{len(expected)} rows"
    headers = page.locator(".jp-DicomlakeResults-name").all_inner_texts()
    assert headers == COLUMNS
    drawn = grid_rows(page)
    assert drawn == [[as_text(v) for v in r] for r in expected[:len(drawn)]]
    shot(page, "21-results-tab")


def test_sort_by_a_numeric_column(page, expected):
    header = page.locator(f'.jp-DicomlakeResults-table th[data-col="{SORTED}"]')
    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert header.get_attribute("aria-sort") == "descending"
    drawn = grid_rows(page)
    want = by_sorted_descending(expected)
    assert drawn == [[as_text(v) for v in r] for r in want[:len(drawn)]]
    shot(page, "22-results-sorted")


def test_download_csv_is_the_rows_in_the_order_shown(page, expected):
    with page.expect_download() as info:
        page.click(".jp-DicomlakeResults-csv")
    download = info.value
    assert download.suggested_filename.endswith(".csv")
    raw = open(download.path(), "rb").read()
    (ARTIFACTS / "results.csv").write_bytes(raw)
    text = raw.decode("utf-8")
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")  # RFC 4180 CRLF
    records = list(csv.reader(io.StringIO(text, newline="")))
    assert records[0] == COLUMNS
    want = [["" if v is None else str(v) for v in r] for r in by_sorted_descending(expected)]
    assert records[1:] == want


def test_select_rows_and_copy_them_as_tsv(page, expected):
    numbers = page.locator(".jp-DicomlakeResults-rowNumber")
    numbers.nth(0).click()
    numbers.nth(2).click(modifiers=["Shift"])
    assert page.locator(".jp-DicomlakeResults-grid td.jp-mod-selected[data-col]").count() == 12
    assert page.inner_text(".jp-DicomlakeResults-copy") == "Copy 12 cells"
    page.keyboard.press("Control+C")
    copied = page.evaluate("navigator.clipboard.readText()")
    want = by_sorted_descending(expected)[:3]
    assert copied == "".join("\t".join("" if v is None else str(v) for v in r) + "\r\n"
                             for r in want)
    shot(page, "23-results-selected")


def test_drag_a_column_border_to_resize(page):
    header = page.locator('.jp-DicomlakeResults-table th[data-col="1"]')
    before = header.bounding_box()["width"]
    handle = header.locator(".jp-DicomlakeResults-resize").bounding_box()
    x, y = handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 60, y, steps=5)
    page.mouse.move(x + 120, y, steps=5)
    page.mouse.up()
    after = header.bounding_box()["width"]
    assert abs(after - before - 120) <= 2, (before, after)
    # the drag did not sort
    assert header.get_attribute("aria-sort") == "none"


def test_chart_two_columns_with_vega_lite(page):
    page.click(".jp-DicomlakeResults-chartToggle")
    page.wait_for_selector(".jp-DicomlakeChart-x")
    page.select_option(".jp-DicomlakeChart-x", label="modality")
    page.select_option(".jp-DicomlakeChart-y", label="file_size")
    page.select_option(".jp-DicomlakeChart-mark", label="bar")
    # vega draws into a canvas or svg of class "marks" (the embed's menu icon is an svg too)
    chart = page.wait_for_selector(
        ".jp-DicomlakeChart-area canvas.marks, .jp-DicomlakeChart-area svg.marks")
    box = chart.bounding_box()
    assert box["width"] > 200 and box["height"] > 200
    assert page.inner_text(".jp-DicomlakeChart-message") == ""
    shot(page, "24-results-chart")


def test_open_in_notebook_writes_a_cell_that_returns_the_rows(page, expected, sql):
    page.click(".jp-DicomlakeResults-notebook")
    cell = page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content:has-text('query(')")
    source = cell.inner_text()
    assert sql in source and "from dicomlake.sql.notebook import query" in source
    page.wait_for_selector(".jp-StatusBar-TextItem:has-text('| Idle')")
    page.click('.lm-MenuBar-itemLabel:text-is("Run")')
    page.click('.lm-Menu-itemLabel:text-is("Run All Cells")')
    table = page.wait_for_selector(".jp-NotebookPanel .jp-OutputArea-output table.dataframe")
    header = table.eval_on_selector_all("thead th", "ths => ths.map(t => t.textContent)")
    assert header[1:] == COLUMNS
    shown = table.eval_on_selector_all(
        "tbody tr", "rows => rows.map(r => Array.from(r.querySelectorAll('td'))"
                    ".map(c => c.textContent))")
    # pandas shows the first and last rows of a long frame, with '...' between, and cuts
    # long text (the paths) to its first characters and '...'
    rows = [["None" if v is None else str(v) for v in r] for r in expected]

    def same(cells: list[str], want: list[str]) -> bool:
        path = cells[0].removesuffix("...")
        return cells[1:] == want[1:] and len(path) >= 40 and want[0].startswith(path)

    assert all(same(c, w) for c, w in zip(shown[:5], rows[:5], strict=True))
    assert same(shown[-1], rows[-1])
    shot(page, "25-results-notebook")
