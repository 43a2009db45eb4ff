import { IRenderMimeRegistry, MimeModel } from '@jupyterlab/rendermime';
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { JSONObject, JSONValue } from '@lumino/coreutils';
import { Panel, Widget } from '@lumino/widgets';

import { cellText, errorMessage, h } from './dom';
import { isNumericType, isTemporalType } from './resultsFormat';
import { IColumn } from './tokens';

/**
 * The Vega-Lite MIME type JupyterLab 4.6's @jupyterlab/vega5-extension renders (it also
 * takes v3 and v4; v5 is the newest it registers).
 */
export const VEGALITE_MIME = 'application/vnd.vegalite.v5+json';
const VEGALITE_SCHEMA = 'https://vega.github.io/schema/vega-lite/v5.json';

/** The marks offered: what a result's two columns are usually looked at with. */
export type ChartMark = 'bar' | 'line' | 'point';
const MARKS: ChartMark[] = ['bar', 'line', 'point'];

type FieldType = 'quantitative' | 'temporal' | 'nominal';

function fieldType(column: IColumn): FieldType {
  if (isNumericType(column.type)) {
    return 'quantitative';
  }
  return isTemporalType(column.type) ? 'temporal' : 'nominal';
}

/** A value as the spec carries it: numbers for quantitative fields, text otherwise. */
function specValue(value: unknown, type: FieldType): JSONValue {
  if (value === null || value === undefined) {
    return null;
  }
  if (type === 'quantitative') {
    const number = Number(value);
    return Number.isFinite(number) ? number : null;
  }
  return cellText(value);
}

/**
 * A Vega-Lite spec of two columns of `rows`, the data inlined. The fields are named `x` and
 * `y` in the data (a column name with a dot or bracket would be read as a nested path) and
 * titled with the column names.
 */
export function chartSpec(
  columns: IColumn[],
  rows: readonly (readonly unknown[])[],
  x: number,
  y: number,
  mark: ChartMark,
  width: number
): JSONObject {
  const xType = fieldType(columns[x]);
  const yType = fieldType(columns[y]);
  return {
    $schema: VEGALITE_SCHEMA,
    width,
    height: 320,
    data: { values: rows.map(row => ({ x: specValue(row[x], xType), y: specValue(row[y], yType) })) },
    mark: { type: mark, tooltip: true },
    encoding: {
      x: { field: 'x', type: xType, title: columns[x].name },
      y: { field: 'y', type: yType, title: columns[y].name }
    }
  };
}

function labelled(label: string, select: HTMLSelectElement): HTMLLabelElement {
  return h('label', { className: 'jp-DicomlakeChart-field' }, h('span', { text: label }), select);
}

/**
 * Chart controls (x, y, mark) and the chart, drawn by whichever renderer JupyterLab has for
 * `VEGALITE_MIME`, the same one notebook outputs use; none is bundled here.
 */
export class ResultsChart extends Panel {
  constructor(
    private readonly _columns: IColumn[],
    private readonly _rows: () => unknown[][],
    private readonly _rendermime: IRenderMimeRegistry
  ) {
    super();
    this.addClass('jp-DicomlakeChart');
    const numeric = _columns.findIndex(c => isNumericType(c.type));
    const category = _columns.findIndex(c => !isNumericType(c.type));
    const x = category >= 0 ? category : 0;
    const y = numeric >= 0 && numeric !== x ? numeric : Math.min(1, _columns.length - 1);
    this._x = this._select('x', _columns.map(c => c.name), x);
    this._y = this._select('y', _columns.map(c => c.name), y);
    // bars for categories, a line over time, points for two measures
    const xType = fieldType(_columns[x]);
    this._mark = this._select('mark', MARKS, xType === 'nominal' ? 0 : xType === 'temporal' ? 1 : 2);
    this._message = h('div', { className: 'jp-DicomlakeChart-message' });
    this.addWidget(
      new Widget({
        node: h(
          'div',
          { className: 'jp-DicomlakeChart-controls' },
          labelled('x', this._x),
          labelled('y', this._y),
          labelled('mark', this._mark),
          this._message
        )
      })
    );
    this._area = new Panel();
    this._area.addClass('jp-DicomlakeChart-area');
    this.addWidget(this._area);
  }

  /** Draw the chart for the chosen columns and mark (again, e.g. after a resize). */
  async draw(): Promise<void> {
    this._message.textContent = '';
    if (!this._rendermime.mimeTypes.includes(VEGALITE_MIME)) {
      this._message.textContent =
        `JupyterLab has no renderer for ${VEGALITE_MIME}: enable @jupyterlab/vega5-extension to chart results.`;
      return;
    }
    const spec = chartSpec(
      this._columns,
      this._rows(),
      this._x.selectedIndex,
      this._y.selectedIndex,
      MARKS[this._mark.selectedIndex],
      Math.max(240, this.node.clientWidth - 120)
    );
    this._renderer?.dispose();
    const renderer = this._rendermime.createRenderer(VEGALITE_MIME);
    this._renderer = renderer;
    this._area.addWidget(renderer);
    try {
      await renderer.renderModel(new MimeModel({ data: { [VEGALITE_MIME]: spec }, trusted: true }));
    } catch (error) {
      this._message.textContent = `The chart failed: ${errorMessage(error)}`;
    }
  }

  private _select(name: string, options: string[], selected: number): HTMLSelectElement {
    const select = h('select', { className: `jp-DicomlakeChart-${name}`, attrs: { 'aria-label': name } });
    options.forEach((option, i) => {
      const item = h('option', { text: option, attrs: { value: String(i) } });
      item.selected = i === selected;
      select.append(item);
    });
    select.addEventListener('change', () => void this.draw());
    return select;
  }

  private readonly _x: HTMLSelectElement;
  private readonly _y: HTMLSelectElement;
  private readonly _mark: HTMLSelectElement;
  private readonly _message: HTMLDivElement;
  private readonly _area: Panel;
  private _renderer: IRenderMime.IRenderer | null = null;
}
