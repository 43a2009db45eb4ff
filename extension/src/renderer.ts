import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Panel } from '@lumino/widgets';

import { DatasetBrowser } from './browser';
import { IDicomlakeClient, IFilters } from './tokens';

/** What `dicomlake.browse(...)` returns in a notebook. */
export const MIME_TYPE = 'application/vnd.dicomlake.browser+json';

/**
 * Renders the browser widget inside an output area. A panel, so the browser is a child
 * widget: the output area attaches the renderer to the page after `renderModel`.
 */
class BrowserRenderer extends Panel implements IRenderMime.IRenderer {
  constructor(private _client: IDicomlakeClient) {
    super();
    this.addClass('jp-DicomlakeBrowser-output');
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const doc = model.data[MIME_TYPE] as { filters?: IFilters } | undefined;
    if (this._browser) {
      this._browser.dispose();
    }
    this._browser = new DatasetBrowser(this._client, doc?.filters ?? {});
    this.addWidget(this._browser);
    await this._browser.start();
  }

  dispose(): void {
    this._browser?.dispose();
    super.dispose();
  }

  private _browser: DatasetBrowser | null = null;
}

/** `dicomlake.browse(...)` in notebooks: a renderer for the browser's MIME type. */
export const rendererPlugin: JupyterFrontEndPlugin<void> = {
  id: '@dicomlake/jupyterlab:notebook-browser',
  description: 'Shows the dataset browser in notebook outputs (dicomlake.browse()).',
  autoStart: true,
  requires: [IRenderMimeRegistry, IDicomlakeClient],
  activate: (app: JupyterFrontEnd, rendermime: IRenderMimeRegistry, client: IDicomlakeClient) => {
    void app;
    rendermime.addFactory(
      { safe: true, mimeTypes: [MIME_TYPE], defaultRank: 50, createRenderer: () => new BrowserRenderer(client) },
      50
    );
  }
};
