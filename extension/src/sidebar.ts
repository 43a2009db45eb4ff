import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IStateDB } from '@jupyterlab/statedb';
import { LabIcon } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Panel, Widget } from '@lumino/widgets';

import { cellText, copyText, errorMessage, h, sqlName } from './dom';
import { SqlEditor } from './editor';
import { IResultsOpener } from './resultsToken';
import { IDicomlakeClient, IQueryPage, IStatementError } from './tokens';

/** Command IDs of the SQL sidebar. */
export namespace CommandIDs {
  export const open = 'dicomlake:open-sql-sidebar';
  export const run = 'dicomlake:run-sql';
}

const PAGE_SIZE = 50;
const HISTORY_SIZE = 50;
const HISTORY_KEY = '@dicomlake/jupyterlab:sql-sidebar:history';

/** The sidebar's icon: a database cylinder. */
export const dicomlakeIcon = new LabIcon({
  name: 'dicomlake:database',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<path d="M12 3C7.6 3 4 4.3 4 6v12c0 1.7 3.6 3 8 3s8-1.3 8-3V6c0-1.7-3.6-3-8-3zm0 2c3.9 0 6 1.1 6 1s-2.1 1-6 1-6-.9-6-1 2.1-1 6-1zm6 13c0 .1-2.1 1-6 1s-6-.9-6-1v-2.3c1.5.8 3.6 1.3 6 1.3s4.5-.5 6-1.3V18zm0-4.5c0 .1-2.1 1-6 1s-6-.9-6-1v-2.3c1.5.8 3.6 1.3 6 1.3s4.5-.5 6-1.3v2.3zm0-4.5c0 .1-2.1 1-6 1s-6-.9-6-1V7.7C7.5 8.5 9.6 9 12 9s4.5-.5 6-1.3V9z"/>' +
    '</g></svg>'
});

/** A history entry: what ran and how it ended. */
interface IHistoryItem {
  sql: string;
  state: string;
  rows: number;
  at: string;
}

/** A node of the lazily loaded schema tree (catalog > schema > table > column). */
class TreeNode {
  constructor(
    readonly path: string[],
    readonly kind: 'catalog' | 'schema' | 'table' | 'column',
    readonly type: string | null,
    private _sidebar: SqlSidebar
  ) {
    const name = path[path.length - 1];
    this.node = h('li', {
      className: `jp-DicomlakeTree-node jp-DicomlakeTree-${kind}`,
      attrs: { 'data-name': name, 'data-path': path.join('.') }
    });
    const leaf = kind === 'column';
    this._caret = h('span', {
      className: 'jp-DicomlakeTree-caret',
      text: leaf ? '' : '▸'
    });
    const label = h(
      'span',
      { className: 'jp-DicomlakeTree-label', title: 'Double-click to insert into the editor' },
      h('span', { className: 'jp-DicomlakeTree-name', text: name })
    );
    if (type) {
      label.append(h('span', { className: 'jp-DicomlakeTree-type', text: type }));
    }
    const insert = h('button', {
      className: 'jp-DicomlakeTree-insert jp-mod-styled',
      text: '⤓',
      title: `Insert ${this.insertText()} into the editor`
    });
    insert.addEventListener('click', event => {
      event.stopPropagation();
      this._sidebar.editor.insert(this.insertText());
    });
    const row = h('div', { className: 'jp-DicomlakeTree-row' }, this._caret, label, insert);
    row.addEventListener('click', () => void this.toggle());
    row.addEventListener('dblclick', event => {
      event.preventDefault();
      this._sidebar.editor.insert(this.insertText());
    });
    this.node.append(row);
    this._children = h('ul', { className: 'jp-DicomlakeTree-children' });
    this._children.hidden = true;
    this.node.append(this._children);
  }

  /** What inserting this node puts in the editor. */
  insertText(): string {
    if (this.kind === 'column') {
      return sqlName(this.path[3]);
    }
    if (this.kind === 'table') {
      return this.path.slice(1).map(sqlName).join('.');
    }
    return this.path.map(sqlName).join('.');
  }

  async toggle(): Promise<void> {
    if (this.kind === 'column') {
      return;
    }
    if (!this._children.hidden) {
      this._children.hidden = true;
      this._caret.textContent = '▸';
      return;
    }
    this._children.hidden = false;
    this._caret.textContent = '▾';
    if (!this._loaded) {
      this._loaded = true;
      await this.load();
    }
  }

  async load(): Promise<void> {
    this._children.replaceChildren(
      h('li', { className: 'jp-DicomlakeTree-loading', text: 'loading…' })
    );
    try {
      const level = await this._sidebar.client.catalog(this.path);
      this._sidebar.showStatement(level.sql);
      if (level.error) {
        this._children.replaceChildren(
          h('li', { className: 'jp-DicomlakeTree-error', text: level.error.message })
        );
        this._loaded = false;
        return;
      }
      const kind = childKind[this.kind];
      const nodes = level.items.map(
        item => new TreeNode([...this.path, item.name], kind, item.type, this._sidebar)
      );
      this._children.replaceChildren(...nodes.map(n => n.node));
      if (nodes.length === 0) {
        this._children.append(h('li', { className: 'jp-DicomlakeTree-empty', text: '(empty)' }));
      }
    } catch (error) {
      this._loaded = false;
      this._children.replaceChildren(
        h('li', { className: 'jp-DicomlakeTree-error', text: errorMessage(error) })
      );
    }
  }

  readonly node: HTMLLIElement;
  private _caret: HTMLSpanElement;
  private _children: HTMLUListElement;
  private _loaded = false;
}

const childKind: { [kind: string]: 'schema' | 'table' | 'column' } = {
  catalog: 'schema',
  schema: 'table',
  table: 'column'
};

/**
 * The SQL sidebar: connection status, schema tree, editor, run/cancel, paged results,
 * history. Every request goes to the Jupyter server, which runs it at the dicomlake SQL
 * endpoint as the mapped SQL user; the browser never sees lake credentials.
 */
export class SqlSidebar extends Panel {
  constructor(
    readonly client: IDicomlakeClient,
    private _state: IStateDB | null,
    private _results: IResultsOpener | null = null
  ) {
    super();
    this.id = 'dicomlake-sql-sidebar';
    this.addClass('jp-DicomlakeSql');
    this.title.icon = dicomlakeIcon;
    this.title.caption = 'dicomlake SQL';

    this._status = h('div', { className: 'jp-DicomlakeSql-status', text: 'connecting…' });
    const refresh = h('button', {
      className: 'jp-DicomlakeSql-refresh jp-mod-styled',
      text: '⟳',
      title: 'Check the connection and reload the schema tree'
    });
    refresh.addEventListener('click', () => void this.refresh());
    this.addWidget(
      new Widget({
        node: h(
          'div',
          { className: 'jp-DicomlakeSql-header' },
          h('span', { className: 'jp-DicomlakeSql-title', text: 'dicomlake SQL' }),
          refresh,
          this._status
        )
      })
    );

    this._tree = h('ul', { className: 'jp-DicomlakeTree' });
    this.addWidget(
      new Widget({
        node: h(
          'details',
          { className: 'jp-DicomlakeSql-section jp-DicomlakeSql-schema', attrs: { open: '' } },
          h('summary', { text: 'Schema' }),
          this._tree
        )
      })
    );

    this.editor = new SqlEditor({
      onRun: () => void this.run(),
      initial: 'SELECT modality, count(*) AS images\nFROM dicom.instances\nGROUP BY modality\nORDER BY images DESC'
    });
    this.addWidget(this.editor);

    this._runButton = h('button', {
      className: 'jp-DicomlakeSql-run jp-mod-styled jp-mod-accept',
      text: '▶ Run',
      title: 'Run the statement (Shift+Enter)'
    });
    this._runButton.addEventListener('click', () => void this.run());
    this._cancelButton = h('button', {
      className: 'jp-DicomlakeSql-cancel jp-mod-styled jp-mod-warn',
      text: '■ Cancel',
      title: 'Cancel the running statement'
    });
    this._cancelButton.disabled = true;
    this._cancelButton.addEventListener('click', () => void this.cancel());
    this._statement = h('code', { className: 'jp-DicomlakeSql-lastStatement' });
    this.addWidget(
      new Widget({
        node: h(
          'div',
          { className: 'jp-DicomlakeSql-toolbar' },
          this._runButton,
          this._cancelButton,
          this._statement
        )
      })
    );

    this._resultInfo = h('div', { className: 'jp-DicomlakeSql-resultInfo' });
    this._openTab = h('button', { className: 'jp-DicomlakeSql-openTab jp-mod-styled', text: 'Open in tab' });
    this._openTab.addEventListener('click', () => {
      if (this._done) {
        this._results?.open(this._done);
      }
    });
    this._toNotebook = h('button', {
      className: 'jp-DicomlakeSql-toNotebook jp-mod-styled',
      text: 'Open in notebook',
      title: 'Write a notebook cell that runs this SQL and returns a pandas DataFrame'
    });
    this._toNotebook.addEventListener('click', () => void this._writeNotebook());
    this._resultActions = h('div', { className: 'jp-DicomlakeSql-resultActions' }, this._openTab, this._toNotebook);
    this._resultActions.hidden = true;
    this._error = h('div', { className: 'jp-DicomlakeSql-error' });
    this._error.hidden = true;
    this._grid = h('div', { className: 'jp-DicomlakeSql-grid' });
    this._prev = h('button', { className: 'jp-DicomlakeSql-prev jp-mod-styled', text: '‹ Prev' });
    this._next = h('button', { className: 'jp-DicomlakeSql-next jp-mod-styled', text: 'Next ›' });
    this._pageInfo = h('span', { className: 'jp-DicomlakeSql-pageInfo' });
    this._prev.addEventListener('click', () => void this.showPage(this._offset - PAGE_SIZE));
    this._next.addEventListener('click', () => void this.showPage(this._offset + PAGE_SIZE));
    this._pager = h(
      'div',
      { className: 'jp-DicomlakeSql-pager' },
      this._prev,
      this._pageInfo,
      this._next
    );
    this._pager.hidden = true;
    this.addWidget(
      new Widget({
        node: h(
          'div',
          { className: 'jp-DicomlakeSql-section jp-DicomlakeSql-results' },
          this._resultInfo,
          this._resultActions,
          this._error,
          this._grid,
          this._pager
        )
      })
    );

    this._history = h('ol', { className: 'jp-DicomlakeSql-history' });
    this.addWidget(
      new Widget({
        node: h(
          'details',
          { className: 'jp-DicomlakeSql-section jp-DicomlakeSql-historySection' },
          h('summary', { text: 'History' }),
          this._history
        )
      })
    );
    void this._loadHistory();
  }

  readonly editor: SqlEditor;

  /** The schema tree loads when the panel is first shown, not at JupyterLab start. */
  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    if (!this._shown) {
      this._shown = true;
      void this.refresh();
    }
  }

  /** Check the connection, reload the tree and the completion schema. */
  async refresh(): Promise<void> {
    this._status.className = 'jp-DicomlakeSql-status';
    this._status.textContent = 'connecting…';
    try {
      const status = await this.client.status();
      if (status.connected) {
        this._status.classList.add('jp-mod-connected');
        this._status.textContent = `● connected as ${status.sqlUser} to ${status.endpoint}`;
        this._status.title = `Jupyter user ${status.jupyterUser}; server ${status.serverVersion}`;
      } else {
        this._status.classList.add('jp-mod-disconnected');
        this._status.textContent = `● not connected: ${status.error ?? 'unknown error'}`;
      }
    } catch (error) {
      this._status.classList.add('jp-mod-disconnected');
      this._status.textContent = `● not connected: ${errorMessage(error)}`;
    }
    const root = new TreeNode(['dicomlake'], 'catalog', null, this);
    this._tree.replaceChildren();
    try {
      const level = await this.client.catalog([]);
      this.showStatement(level.sql);
      for (const item of level.items) {
        const node = item.name === 'dicomlake' ? root : new TreeNode([item.name], 'catalog', null, this);
        this._tree.append(node.node);
      }
    } catch (error) {
      this._tree.append(h('li', { className: 'jp-DicomlakeTree-error', text: errorMessage(error) }));
    }
    try {
      const completions = await this.client.completions();
      this.editor.setSchema(completions.tables);
    } catch (error) {
      console.warn('dicomlake: no completion schema', error);
    }
  }

  /** Show the last statement the sidebar sent on the user's behalf. */
  showStatement(sql: string): void {
    this._statement.textContent = sql.replace(/\s+/g, ' ');
    this._statement.title = `Last statement sent: ${sql}\n(click to copy)`;
    this._statement.onclick = () => void copyText(sql);
  }

  /** Run the editor's statement. */
  async run(): Promise<void> {
    const sql = this.editor.value.trim();
    if (!sql || this._running) {
      return;
    }
    this._running = true;
    this._runButton.disabled = true;
    this._cancelButton.disabled = false;
    this.editor.markError(null, null);
    this._error.hidden = true;
    this._grid.replaceChildren();
    this._pager.hidden = true;
    this._resultActions.hidden = true;
    this._done = null;
    this._resultInfo.textContent = 'running…';
    let page: IQueryPage | null = null;
    try {
      page = await this.client.startQuery(sql);
      this._queryId = page.id;
      while (!page.done) {
        this._resultInfo.textContent = `${page.state.toLowerCase()}… ${page.totalRows} rows, ${page.elapsedSeconds.toFixed(1)} s`;
        page = await this.client.fetchPage(page.id, 0, PAGE_SIZE, 2);
      }
      this._finish(page);
      if (!page.error) {
        await this.showPage(0);
      }
    } catch (error) {
      this._showError({ message: errorMessage(error), name: 'REQUEST_FAILED', type: 'EXTERNAL', line: null, column: null });
      this._resultInfo.textContent = '';
    } finally {
      this._running = false;
      this._runButton.disabled = false;
      this._cancelButton.disabled = true;
      this._addHistory({
        sql,
        state: page?.state ?? 'FAILED',
        rows: page?.totalRows ?? 0,
        at: new Date().toISOString()
      });
    }
  }

  /** Cancel the running statement. */
  async cancel(): Promise<void> {
    if (this._queryId && this._running) {
      try {
        await this.client.cancelQuery(this._queryId);
      } catch (error) {
        console.warn('dicomlake: cancel failed', error);
      }
    }
  }

  /** Show the page of rows starting at `offset`. */
  async showPage(offset: number): Promise<void> {
    if (!this._queryId) {
      return;
    }
    const page = await this.client.fetchPage(this._queryId, Math.max(0, offset), PAGE_SIZE, 0);
    this._offset = page.offset;
    const table = h('table', { className: 'jp-DicomlakeSql-table' });
    const head = h('tr');
    for (const column of page.columns) {
      head.append(h('th', { title: column.type }, h('span', { text: column.name }), h('small', { text: column.type })));
    }
    table.append(h('thead', {}, head));
    const body = h('tbody');
    for (const row of page.rows) {
      const tr = h('tr');
      for (const value of row) {
        const text = cellText(value);
        tr.append(h('td', { className: value === null ? 'jp-mod-null' : '', text: text.length > 200 ? text.slice(0, 199) + '…' : text, title: text.length > 200 ? text.slice(0, 2000) : '' }));
      }
      body.append(tr);
    }
    table.append(body);
    this._grid.replaceChildren(table);
    const last = Math.min(page.offset + page.rows.length, page.totalRows);
    this._pageInfo.textContent = page.totalRows
      ? `rows ${page.offset + 1}–${last} of ${page.totalRows}${page.truncated ? '+' : ''}`
      : 'no rows';
    this._prev.disabled = page.offset <= 0;
    this._next.disabled = last >= page.totalRows;
    this._pager.hidden = false;
  }

  private _finish(page: IQueryPage): void {
    if (page.error) {
      this._showError(page.error);
      this._resultInfo.textContent = `${page.state.toLowerCase()} after ${page.elapsedSeconds.toFixed(1)} s`;
      return;
    }
    const more = page.truncated ? ' (truncated: the sidebar keeps the first rows only)' : '';
    this._resultInfo.textContent = `${page.totalRows} rows in ${page.elapsedSeconds.toFixed(1)} s${more}`;
    this._done = page;
    if (this._results) {
      // more rows than one sidebar page: the tab is where they can be read, so say so
      const large = page.totalRows > PAGE_SIZE;
      this._openTab.classList.toggle('jp-mod-accept', large);
      this._openTab.title = large
        ? `All ${page.totalRows} rows in a tab: sort, resize, copy, CSV, chart`
        : 'The result in a tab: sort, resize, copy, CSV, chart';
      this._resultActions.hidden = false;
    }
  }

  private async _writeNotebook(): Promise<void> {
    if (!this._done || !this._results) {
      return;
    }
    try {
      await this._results.toNotebook(this._done.sql);
    } catch (error) {
      this._showError({ message: errorMessage(error), name: 'OPEN_IN_NOTEBOOK_FAILED', type: 'EXTERNAL', line: null, column: null });
    }
  }

  private _showError(error: IStatementError): void {
    const where = error.line ? ` at line ${error.line}, column ${error.column ?? 1}` : '';
    this._error.replaceChildren(
      h('strong', { className: 'jp-DicomlakeSql-errorName', text: `${error.name}${where}` }),
      h('div', { className: 'jp-DicomlakeSql-errorMessage', text: error.message })
    );
    this._error.hidden = false;
    this.editor.markError(error.line, error.column);
  }

  private async _loadHistory(): Promise<void> {
    if (this._state) {
      const saved = (await this._state.fetch(HISTORY_KEY)) as unknown as IHistoryItem[] | undefined;
      this._items = Array.isArray(saved) ? saved : [];
    }
    this._renderHistory();
  }

  private _addHistory(item: IHistoryItem): void {
    this._items = [item, ...this._items.filter(i => i.sql !== item.sql)].slice(0, HISTORY_SIZE);
    if (this._state) {
      void this._state.save(HISTORY_KEY, this._items.map(entry => ({ ...entry })));
    }
    this._renderHistory();
  }

  private _renderHistory(): void {
    this._history.replaceChildren(
      ...this._items.map(item => {
        const li = h(
          'li',
          { className: `jp-DicomlakeSql-historyItem jp-mod-${item.state.toLowerCase()}`, title: `${item.state}, ${item.rows} rows, ${item.at}\nClick to load into the editor` },
          h('code', { text: item.sql.replace(/\s+/g, ' ') })
        );
        li.addEventListener('click', () => {
          this.editor.value = item.sql;
          this.editor.focus();
        });
        return li;
      })
    );
  }

  private _status: HTMLDivElement;
  private _tree: HTMLUListElement;
  private _runButton: HTMLButtonElement;
  private _cancelButton: HTMLButtonElement;
  private _statement: HTMLElement;
  private _resultInfo: HTMLDivElement;
  private _resultActions: HTMLDivElement;
  private _openTab: HTMLButtonElement;
  private _toNotebook: HTMLButtonElement;
  /** The last statement that finished without error: what the result buttons act on. */
  private _done: IQueryPage | null = null;
  private _error: HTMLDivElement;
  private _grid: HTMLDivElement;
  private _pager: HTMLDivElement;
  private _prev: HTMLButtonElement;
  private _next: HTMLButtonElement;
  private _pageInfo: HTMLSpanElement;
  private _history: HTMLOListElement;
  private _items: IHistoryItem[] = [];
  private _queryId: string | null = null;
  private _offset = 0;
  private _running = false;
  private _shown = false;
}

/** The SQL sidebar in the left area. */
export const sidebarPlugin: JupyterFrontEndPlugin<void> = {
  id: '@dicomlake/jupyterlab:sql-sidebar',
  description: 'SQL sidebar over the dicomlake SQL endpoint.',
  autoStart: true,
  requires: [IDicomlakeClient],
  optional: [IStateDB, ICommandPalette, IResultsOpener],
  activate: (
    app: JupyterFrontEnd,
    client: IDicomlakeClient,
    state: IStateDB | null,
    palette: ICommandPalette | null,
    results: IResultsOpener | null
  ) => {
    const sidebar = new SqlSidebar(client, state, results);
    app.shell.add(sidebar, 'left', { rank: 600 });
    app.commands.addCommand(CommandIDs.open, {
      label: 'SQL Sidebar',
      execute: () => app.shell.activateById(sidebar.id)
    });
    app.commands.addCommand(CommandIDs.run, {
      label: 'Run SQL in the Sidebar',
      execute: () => sidebar.run()
    });
    palette?.addItem({ command: CommandIDs.open, category: 'dicomlake' });
  }
};
