import { JupyterFrontEndPlugin } from '@jupyterlab/application';

import { browserPlugin } from './browserPlugin';
import { clientPlugin } from './client';
import { rendererPlugin } from './renderer';
import { resultsPlugin } from './resultsPlugin';
import { sidebarPlugin } from './sidebar';

export * from './tokens';
export { IResultsOpener } from './resultsToken';

/**
 * One plugin per feature: the client service, the SQL sidebar, its results tabs, the
 * browser, the renderer.
 */
const plugins: JupyterFrontEndPlugin<unknown>[] = [
  clientPlugin,
  resultsPlugin,
  sidebarPlugin,
  browserPlugin,
  rendererPlugin
];

export default plugins;
