import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { cellText, copyText, h } from './dom';
import { isNumericType, sortedOrder, tsvText } from './resultsFormat';
import { IColumn } from './tokens';

/** Rows drawn above and below the visible ones, so a fast scroll shows no blank band. */
const OVERSCAN = 20;
/** The row height until one drawn row is measured (matches base.css). */
const DEFAULT_ROW_HEIGHT = 24;
/** Characters of one value put in the DOM; the tooltip holds more, copy and CSV all of it. */
const SHOWN_CHARS = 500;
const MIN_WIDTH = 48;

/** One cell position: a row in the shown (sorted) order and a column index. */
interface ICellPosition {
  row: number;
  col: number;
}

/** The sort the user chose by clicking a header. */
export interface ISortState {
  col: number;
  descending: boolean;
}

/**
 * A spreadsheet-like view of a whole result (up to the server's buffer of 10,000 rows):
 * click a header to sort (ascending, descending, then back to the statement's order),
 * drag a header's right edge to resize, click/drag/shift-click cells or row numbers to
 * select, Ctrl+C (or the tab's Copy button) copies the selection as TSV.
 *
 * A plain HTML table rather than @lumino/datagrid: JupyterLab ships datagrid as a shared
 * module, but this package does not depend on it (no copy in node_modules), and a table
 * gives native text rendering, theming through CSS variables and DOM a test can read. Only
 * the rows in view (plus `OVERSCAN`) are in the DOM, between two spacer rows, so 10,000 rows
 * by 40 columns scroll and sort without building 400,000 cells.
 */
export class ResultsGrid extends Widget {
  constructor(
    readonly columns: IColumn[],
    private readonly _rows: unknown[][]
  ) {
    super();
    this.addClass('jp-DicomlakeResults-grid');
    this.node.tabIndex = 0;
    this._order = _rows.map((_, i) => i);
    this._widths = columns.map((column, i) => initialWidth(column, _rows, i));
    this._numeric = columns.map(column => isNumericType(column.type));

    this._colgroup = h('colgroup');
    this._headRow = h('tr');
    const corner = h('th', {
      className: 'jp-DicomlakeResults-corner',
      title: 'Select all (Ctrl+A)',
      text: '#'
    });
    corner.addEventListener('click', () => this.selectAll());
    this._headRow.append(corner);
    this._colgroup.append(h('col', { attrs: { style: `width: ${this._rowNumberWidth()}px` } }));
    columns.forEach((column, i) => {
      this._colgroup.append(h('col'));
      this._headRow.append(this._header(column, i));
    });
    this._body = h('tbody');
    this._table = h(
      'table',
      { className: 'jp-DicomlakeResults-table' },
      this._colgroup,
      h('thead', {}, this._headRow),
      this._body
    );
    this.node.append(this._table);
    this._applyWidths();

    this.node.addEventListener('scroll', () => this._scheduleRender());
    this.node.addEventListener('keydown', event => this._onKeyDown(event));
    this._body.addEventListener('mousedown', event => this._onMouseDown(event));
    this._body.addEventListener('mouseover', event => this._onMouseOver(event));
  }

  /** The rows in the order shown (the user's sort, else the statement's order). */
  viewRows(): unknown[][] {
    return this._order.map(i => this._rows[i]);
  }

  /** Sort by column `col`; `null` restores the statement's order. */
  sortBy(sort: ISortState | null): void {
    this._sort = sort;
    this._order = sort
      ? sortedOrder(this._rows, sort.col, this.columns[sort.col], sort.descending)
      : this._rows.map((_, i) => i);
    this._headers.forEach((th, col) => {
      const state = sort?.col === col ? (sort.descending ? 'descending' : 'ascending') : 'none';
      th.setAttribute('aria-sort', state);
      this._marks[col].textContent = state === 'ascending' ? '▲' : state === 'descending' ? '▼' : '';
    });
    // positions name rows of the shown order: after a re-sort they would point elsewhere
    this._anchor = this._focus = null;
    this._render(true);
  }

  /** Select every cell. */
  selectAll(): void {
    if (this._rows.length === 0) {
      return;
    }
    this._anchor = { row: 0, col: 0 };
    this._focus = { row: this._rows.length - 1, col: this.columns.length - 1 };
    this._paintSelection();
  }

  /** The selection as TSV (no header), or null when nothing is selected. */
  selectionText(): string | null {
    const range = this._range();
    if (!range) {
      return null;
    }
    const rows: unknown[][] = [];
    for (let r = range.top; r <= range.bottom; r++) {
      rows.push(this._rows[this._order[r]].slice(range.left, range.right + 1));
    }
    return tsvText(null, rows);
  }

  /** Number of cells selected (0 when none): the tab shows it beside its Copy button. */
  selectionSize(): number {
    const range = this._range();
    return range ? (range.bottom - range.top + 1) * (range.right - range.left + 1) : 0;
  }

  /** Called when the selection changes (the tab updates its Copy button's label). */
  onSelectionChanged: (() => void) | null = null;

  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    this._render(true);
  }

  protected onResize(msg: Widget.ResizeMessage): void {
    super.onResize(msg);
    this._render(true);
  }

  private _header(column: IColumn, index: number): HTMLTableCellElement {
    const resize = h('span', {
      className: 'jp-DicomlakeResults-resize',
      title: 'Drag to resize the column'
    });
    const mark = h('span', { className: 'jp-DicomlakeResults-sortMark' });
    const th = h(
      'th',
      {
        title: `${column.name} (${column.type})\nClick to sort`,
        attrs: { 'data-col': String(index), 'aria-sort': 'none' }
      },
      h('span', { className: 'jp-DicomlakeResults-name', text: column.name }),
      mark,
      h('small', { className: 'jp-DicomlakeResults-type', text: column.type }),
      resize
    );
    th.addEventListener('click', event => {
      if (event.target === resize || this._resized) {
        return;
      }
      // ascending, descending, then the statement's own order again
      const current = this._sort?.col === index ? this._sort : null;
      this.sortBy(
        !current ? { col: index, descending: false } : !current.descending ? { col: index, descending: true } : null
      );
    });
    resize.addEventListener('mousedown', event => this._startResize(event, index));
    this._headers.push(th);
    this._marks.push(mark);
    return th;
  }

  private _startResize(event: MouseEvent, index: number): void {
    event.preventDefault();
    event.stopPropagation();
    const startX = event.clientX;
    const startWidth = this._widths[index];
    const move = (e: MouseEvent): void => {
      this._widths[index] = Math.max(MIN_WIDTH, Math.round(startWidth + e.clientX - startX));
      this._applyWidths();
    };
    const up = (): void => {
      document.removeEventListener('mousemove', move, true);
      document.removeEventListener('mouseup', up, true);
      this.node.classList.remove('jp-mod-resizing');
      // the click that ends a drag lands on a header when the mouse left the handle:
      // it must not also sort
      this._resized = true;
      setTimeout(() => (this._resized = false), 0);
    };
    this.node.classList.add('jp-mod-resizing');
    document.addEventListener('mousemove', move, true);
    document.addEventListener('mouseup', up, true);
  }

  private _rowNumberWidth(): number {
    return Math.max(40, String(this._rows.length).length * 8 + 16);
  }

  private _applyWidths(): void {
    const cols = this._colgroup.children;
    this._widths.forEach((width, i) => {
      (cols[i + 1] as HTMLElement).style.width = `${width}px`;
    });
    const total = this._widths.reduce((sum, w) => sum + w, this._rowNumberWidth());
    this._table.style.width = `${total}px`;
  }

  private _scheduleRender(): void {
    if (this._frame === 0) {
      this._frame = requestAnimationFrame(() => {
        this._frame = 0;
        this._render(false);
      });
    }
  }

  /** Draw the rows in view; `force` redraws even when the window did not move. */
  private _render(force: boolean): void {
    const total = this._order.length;
    const height = this._rowHeight;
    const header = this._headRow.offsetHeight;
    const top = Math.max(0, this.node.scrollTop - header);
    const viewport = this.node.clientHeight || 800;
    const first = Math.max(0, Math.floor(top / height) - OVERSCAN);
    const last = Math.min(total, Math.ceil((top + viewport) / height) + OVERSCAN);
    if (!force && first === this._first && last === this._last) {
      return;
    }
    this._first = first;
    this._last = last;
    const span = String(this.columns.length + 1);
    const spacer = (rows: number): HTMLTableRowElement =>
      h(
        'tr',
        { className: 'jp-DicomlakeResults-spacer' },
        h('td', { attrs: { colspan: span, style: `height: ${rows * height}px` } })
      );
    const lines: HTMLTableRowElement[] = [spacer(first)];
    for (let r = first; r < last; r++) {
      const row = this._rows[this._order[r]];
      const tr = h('tr', { attrs: { 'data-row': String(r) } });
      tr.append(h('td', { className: 'jp-DicomlakeResults-rowNumber', text: String(r + 1) }));
      row.forEach((value, c) => {
        const text = cellText(value);
        const isNull = value === null || value === undefined;
        const td = h('td', {
          // numbers line up by their last digit, as in a spreadsheet
          className: isNull ? 'jp-mod-null' : this._numeric[c] ? 'jp-mod-number' : '',
          text: text.length > SHOWN_CHARS ? text.slice(0, SHOWN_CHARS - 1) + '…' : text,
          attrs: { 'data-col': String(c) }
        });
        if (text.length > 40) {
          td.title = text.slice(0, 2000);
        }
        tr.append(td);
      });
      lines.push(tr);
    }
    lines.push(spacer(total - last));
    this._body.replaceChildren(...lines);
    this._paintSelection();
    const drawn = lines[1] as HTMLElement | undefined;
    if (last > first && drawn && drawn.offsetHeight > 0 && drawn.offsetHeight !== this._rowHeight) {
      // the theme's font decides the real height: measure once and redraw with it
      this._rowHeight = drawn.offsetHeight;
      this._render(true);
    }
  }

  private _range(): { top: number; bottom: number; left: number; right: number } | null {
    if (!this._anchor || !this._focus) {
      return null;
    }
    return {
      top: Math.min(this._anchor.row, this._focus.row),
      bottom: Math.max(this._anchor.row, this._focus.row),
      left: Math.min(this._anchor.col, this._focus.col),
      right: Math.max(this._anchor.col, this._focus.col)
    };
  }

  /** Mark the drawn cells in the selection; a row number is marked when its whole row is. */
  private _paintSelection(): void {
    // with nothing selected, an empty range (top past bottom) marks no cell
    const range = this._range() ?? { top: 1, bottom: 0, left: 1, right: 0 };
    const wholeRows = range.left === 0 && range.right === this.columns.length - 1;
    for (const tr of Array.from(this._body.rows)) {
      if (tr.dataset.row === undefined) {
        continue;
      }
      const row = Number(tr.dataset.row);
      const inRows = row >= range.top && row <= range.bottom;
      for (const td of Array.from(tr.cells)) {
        const col = td.dataset.col === undefined ? -1 : Number(td.dataset.col);
        const selected = inRows && (col < 0 ? wholeRows : col >= range.left && col <= range.right);
        td.classList.toggle('jp-mod-selected', selected);
      }
    }
    this.onSelectionChanged?.();
  }

  /** The cell under an event: a data cell, or a row number (column -1). */
  private _cellAt(target: EventTarget | null): ICellPosition | null {
    const td = (target as HTMLElement | null)?.closest('td');
    const tr = td?.parentElement;
    if (!td || !tr || tr.dataset.row === undefined) {
      return null;
    }
    return { row: Number(tr.dataset.row), col: td.dataset.col === undefined ? -1 : Number(td.dataset.col) };
  }

  private _onMouseDown(event: MouseEvent): void {
    const cell = this._cellAt(event.target);
    if (!cell || event.button !== 0) {
      return;
    }
    event.preventDefault();
    this.node.focus({ preventScroll: true });
    const last = this.columns.length - 1;
    this._rowMode = cell.col < 0;
    if (event.shiftKey && this._anchor) {
      if (this._rowMode) {
        this._anchor = { row: this._anchor.row, col: 0 };
      }
    } else {
      this._anchor = { row: cell.row, col: this._rowMode ? 0 : cell.col };
    }
    this._focus = { row: cell.row, col: this._rowMode ? last : cell.col };
    this._paintSelection();
    this._dragging = true;
    const up = (): void => {
      this._dragging = false;
      document.removeEventListener('mouseup', up, true);
    };
    document.addEventListener('mouseup', up, true);
  }

  private _onMouseOver(event: MouseEvent): void {
    if (!this._dragging || !this._anchor) {
      return;
    }
    const cell = this._cellAt(event.target);
    if (!cell) {
      return;
    }
    const col = this._rowMode || cell.col < 0 ? this.columns.length - 1 : cell.col;
    if (this._focus?.row !== cell.row || this._focus.col !== col) {
      this._focus = { row: cell.row, col };
      this._paintSelection();
    }
  }

  private _onKeyDown(event: KeyboardEvent): void {
    const mod = event.ctrlKey || event.metaKey;
    if (mod && event.key.toLowerCase() === 'c') {
      const text = this.selectionText();
      if (text !== null) {
        event.preventDefault();
        event.stopPropagation();
        void copyText(text);
      }
    } else if (mod && event.key.toLowerCase() === 'a') {
      event.preventDefault();
      event.stopPropagation();
      this.selectAll();
    } else if (event.key === 'Escape') {
      this._anchor = this._focus = null;
      this._paintSelection();
    }
  }

  private readonly _colgroup: HTMLTableColElement;
  private readonly _headRow: HTMLTableRowElement;
  private readonly _body: HTMLTableSectionElement;
  private readonly _table: HTMLTableElement;
  private readonly _widths: number[];
  private readonly _numeric: boolean[];
  private readonly _headers: HTMLTableCellElement[] = [];
  private readonly _marks: HTMLSpanElement[] = [];
  private _order: number[];
  private _sort: ISortState | null = null;
  private _anchor: ICellPosition | null = null;
  private _focus: ICellPosition | null = null;
  private _dragging = false;
  private _rowMode = false;
  private _resized = false;
  private _rowHeight = DEFAULT_ROW_HEIGHT;
  private _first = -1;
  private _last = -1;
  private _frame = 0;
}

/** A first width from the header and the first values' lengths (the user can drag it). */
function initialWidth(column: IColumn, rows: unknown[][], index: number): number {
  let chars = Math.max(column.name.length + 2, column.type.length);
  for (const row of rows.slice(0, 200)) {
    chars = Math.max(chars, Math.min(60, cellText(row[index]).length));
  }
  return Math.max(64, Math.min(420, Math.round(chars * 7.5 + 20)));
}
