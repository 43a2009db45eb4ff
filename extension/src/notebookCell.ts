import { JupyterFrontEnd } from '@jupyterlab/application';
import { Widget } from '@lumino/widgets';

/**
 * A Python string literal holding `sql` exactly: triple-quoted so a multi-line statement
 * reads as it did in the editor, or JSON's escaping (a valid Python literal) when the text
 * could not sit between triple quotes unchanged (backslashes, `"""`, a trailing quote, a
 * carriage return that Python would read as a newline, NUL).
 */
export function pythonString(sql: string): string {
  const plain = !['\\', '"""', '\r', '\0'].some(part => sql.includes(part));
  if (plain && !sql.endsWith('"')) {
    return `"""${sql}"""`;
  }
  return JSON.stringify(sql);
}

/**
 * The code cell "Open in notebook" writes: the same statement through
 * `dicomlake.sql.notebook.query`, which connects as the SQL user the Jupyter server maps
 * this user to (the same identities file the sidebar's queries go through) and returns a
 * pandas DataFrame.
 */
export function notebookSource(sql: string): string {
  return `from dicomlake.sql.notebook import query\n\ndf = query(${pythonString(sql)})\ndf`;
}

/**
 * The parts of a JupyterLab NotebookPanel used here. This package does not depend on
 * @jupyterlab/notebook (no copy in node_modules), so a panel is recognised by its class and
 * these members, all public API of NotebookPanel, Notebook and the shared notebook model.
 */
interface INotebookPanelLike extends Widget {
  readonly context: { readonly ready: Promise<void> };
  readonly content: {
    activeCellIndex: number;
    readonly model: {
      readonly sharedModel: {
        readonly cells: readonly { readonly source: string; setSource(source: string): void }[];
        insertCell(index: number, cell: { cell_type: 'code'; source: string; metadata: object }): unknown;
      };
    } | null;
  };
}

function asNotebook(widget: Widget | null | undefined): INotebookPanelLike | null {
  if (!widget || widget.isDisposed || !widget.hasClass('jp-NotebookPanel')) {
    return null;
  }
  return 'context' in widget && 'content' in widget ? (widget as INotebookPanelLike) : null;
}

/**
 * Writes SQL into a notebook as a code cell: below the active cell of the notebook the
 * user last worked in, or into a new notebook when none is open. The last notebook is
 * followed through the shell's focus changes, because pressing the button focuses the
 * sidebar or the results tab, not the notebook.
 */
export class NotebookWriter {
  constructor(private readonly _app: JupyterFrontEnd) {
    this._last = asNotebook(_app.shell.currentWidget);
    _app.shell.currentChanged?.connect((_, change) => {
      this._last = asNotebook(change.newValue) ?? this._last;
    });
  }

  /** Insert a cell running `sql`, show the notebook and select the cell. */
  async write(sql: string): Promise<void> {
    const source = notebookSource(sql);
    let panel = asNotebook(this._last);
    const fresh = panel === null;
    if (!panel) {
      const created = (await this._app.commands.execute('notebook:create-new', {
        kernelName: 'python3'
      })) as Widget | undefined;
      panel = asNotebook(created);
      if (!panel) {
        throw new Error('JupyterLab did not open a notebook (is the notebook extension enabled?)');
      }
    }
    await panel.context.ready;
    const notebook = panel.content;
    const shared = notebook.model?.sharedModel;
    if (!shared) {
      throw new Error('the notebook has no model yet');
    }
    let index: number;
    if (fresh && shared.cells.length === 1 && shared.cells[0].source === '') {
      // a new notebook starts with one empty cell: fill it rather than leave it above
      index = 0;
      shared.cells[0].setSource(source);
    } else {
      index = Math.min(notebook.activeCellIndex + 1, shared.cells.length);
      shared.insertCell(index, { cell_type: 'code', source, metadata: {} });
    }
    this._app.shell.activateById(panel.id);
    notebook.activeCellIndex = index;
    this._last = panel;
  }

  private _last: INotebookPanelLike | null;
}
