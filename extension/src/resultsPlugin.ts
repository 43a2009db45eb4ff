import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { MainAreaWidget } from '@jupyterlab/apputils';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';

import { NotebookWriter } from './notebookCell';
import { ResultsPanel } from './resultsPanel';
import { IResultsOpener } from './resultsToken';
import { dicomlakeIcon } from './sidebar';
import { IDicomlakeClient, IQueryPage } from './tokens';

/**
 * Results people can look at: the sidebar's "Open in tab" and "Open in notebook". The tabs
 * are not restored after a reload: they show a server-side buffer of a query, which does
 * not outlive the Jupyter server, and running the statement again silently could be slow.
 */
export const resultsPlugin: JupyterFrontEndPlugin<IResultsOpener> = {
  id: '@dicomlake/jupyterlab:results',
  description: 'SQL results in a main-area grid with CSV download and charts; SQL into notebooks.',
  autoStart: true,
  requires: [IDicomlakeClient],
  optional: [IRenderMimeRegistry],
  provides: IResultsOpener,
  activate: (
    app: JupyterFrontEnd,
    client: IDicomlakeClient,
    rendermime: IRenderMimeRegistry | null
  ): IResultsOpener => {
    const notebook = new NotebookWriter(app);
    let count = 0;
    return {
      open: (query: IQueryPage) => {
        const content = new ResultsPanel(client, query, rendermime, notebook);
        const widget = new MainAreaWidget({ content });
        widget.id = `dicomlake-results-${++count}`;
        widget.title.label = `SQL result ${count}`;
        widget.title.caption = query.sql;
        widget.title.icon = dicomlakeIcon;
        widget.title.closable = true;
        app.shell.add(widget, 'main');
        app.shell.activateById(widget.id);
        void content.load();
      },
      toNotebook: (sql: string) => notebook.write(sql)
    };
  }
};
