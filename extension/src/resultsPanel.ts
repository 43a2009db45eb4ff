import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { Panel, Widget } from '@lumino/widgets';

import { copyText, errorMessage, h } from './dom';
import { NotebookWriter } from './notebookCell';
import { ResultsChart } from './resultsChart';
import { csvText, tsvText } from './resultsFormat';
import { ResultsGrid } from './resultsGrid';
import { IDicomlakeClient, IQueryPage } from './tokens';

/** Rows per request while loading a whole result (the server hands out at most 1000). */
const FETCH_ROWS = 1000;

/**
 * A finished sidebar query in a main-area tab: the whole buffered result in a sortable,
 * resizable, selectable grid, with Copy, Download CSV, a chart of two columns and "Open in
 * notebook". The rows are read once from the Jupyter server's buffer of that query, so the
 * tab is a snapshot: the statement is not run again.
 */
export class ResultsPanel extends Panel {
  constructor(
    private readonly _client: IDicomlakeClient,
    private readonly _query: IQueryPage,
    private readonly _rendermime: IRenderMimeRegistry | null,
    private readonly _notebook: NotebookWriter
  ) {
    super();
    this.addClass('jp-DicomlakeResults');
    this._info = h('span', { className: 'jp-DicomlakeResults-info', text: 'loading…' });
    this._copy = this._button('copy', 'Copy', 'Copy the selected cells (or, with none, the whole result with its header) as tab-separated text', () => this._copySelection());
    this._csv = this._button('csv', 'Download CSV', 'Download the result, in the order shown, as CSV (RFC 4180)', () => this._download());
    this._chartToggle = this._button('chartToggle', 'Chart', 'Chart two columns (Vega-Lite)', () => void this._toggleChart());
    const notebook = this._button('notebook', 'Open in notebook', 'Write a notebook cell that runs this SQL and returns a DataFrame', () => void this._toNotebook());
    this._copy.disabled = this._csv.disabled = this._chartToggle.disabled = true;
    this._chartToggle.hidden = this._rendermime === null;
    const sql = h('code', { className: 'jp-DicomlakeResults-sql', text: _query.sql.replace(/\s+/g, ' '), title: _query.sql });
    this.addWidget(
      new Widget({
        node: h(
          'div',
          { className: 'jp-DicomlakeResults-header' },
          sql,
          h('div', { className: 'jp-DicomlakeResults-toolbar' }, this._info, this._copy, this._csv, this._chartToggle, notebook)
        )
      })
    );
    this._body = new Panel();
    this._body.addClass('jp-DicomlakeResults-body');
    this.addWidget(this._body);
  }

  /** Read every buffered row of the query, then show the grid. */
  async load(): Promise<void> {
    const rows: unknown[][] = [];
    try {
      let page: IQueryPage;
      do {
        page = await this._client.fetchPage(this._query.id, rows.length, FETCH_ROWS, 0);
        if (page.error) {
          throw new Error(page.error.message);
        }
        rows.push(...page.rows);
        this._info.textContent = `loading… ${rows.length} of ${page.totalRows} rows`;
      } while (page.rows.length > 0 && rows.length < page.totalRows);
    } catch (error) {
      this._info.textContent = `The rows could not be loaded: ${errorMessage(error)} (run the query again in the sidebar)`;
      this._info.classList.add('jp-mod-error');
      return;
    }
    const more = this._query.truncated ? ' (the first rows only: the server keeps at most this many)' : '';
    this._info.textContent = `${rows.length} rows${more}`;
    this._grid = new ResultsGrid(this._query.columns, rows);
    this._grid.onSelectionChanged = () => {
      const cells = this._grid?.selectionSize() ?? 0;
      this._copy.textContent = cells ? `Copy ${cells} cell${cells === 1 ? '' : 's'}` : 'Copy';
    };
    this._body.insertWidget(0, this._grid);
    this._copy.disabled = this._csv.disabled = this._chartToggle.disabled = false;
  }

  /** The grid, once the rows are loaded. */
  get grid(): ResultsGrid | null {
    return this._grid;
  }

  private _button(name: string, label: string, title: string, onClick: () => void): HTMLButtonElement {
    const button = h('button', { className: `jp-DicomlakeResults-${name} jp-mod-styled`, text: label, title });
    button.addEventListener('click', onClick);
    return button;
  }

  private _copySelection(): void {
    if (!this._grid) {
      return;
    }
    void copyText(this._grid.selectionText() ?? tsvText(this._grid.columns, this._grid.viewRows()));
  }

  private _download(): void {
    if (!this._grid) {
      return;
    }
    const blob = new Blob([csvText(this._grid.columns, this._grid.viewRows())], {
      type: 'text/csv;charset=utf-8;header=present'
    });
    const url = URL.createObjectURL(blob);
    const stamp = new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19);
    const link = h('a', { attrs: { href: url, download: `dicomlake-result-${stamp}.csv` } });
    document.body.append(link);
    link.click();
    link.remove();
    // the download has taken the blob by the next turn; the URL would otherwise live on
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }

  private async _toggleChart(): Promise<void> {
    if (!this._grid || !this._rendermime) {
      return;
    }
    if (!this._chart) {
      const grid = this._grid;
      this._chart = new ResultsChart(grid.columns, () => grid.viewRows(), this._rendermime);
      this._body.addWidget(this._chart);
    } else {
      this._chart.setHidden(!this._chart.isHidden);
    }
    this._chartToggle.classList.toggle('jp-mod-active', !this._chart.isHidden);
    if (!this._chart.isHidden) {
      await this._chart.draw();
    }
  }

  private async _toNotebook(): Promise<void> {
    try {
      await this._notebook.write(this._query.sql);
    } catch (error) {
      this._info.textContent = `Open in notebook failed: ${errorMessage(error)}`;
    }
  }

  private readonly _info: HTMLSpanElement;
  private readonly _copy: HTMLButtonElement;
  private readonly _csv: HTMLButtonElement;
  private readonly _chartToggle: HTMLButtonElement;
  private readonly _body: Panel;
  private _grid: ResultsGrid | null = null;
  private _chart: ResultsChart | null = null;
}
