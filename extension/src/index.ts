import { JupyterFrontEndPlugin } from '@jupyterlab/application';

import { browserPlugin } from './browserPlugin';
import { clientPlugin } from './client';
import { rendererPlugin } from './renderer';
import { sidebarPlugin } from './sidebar';

export * from './tokens';

/** One plugin per feature: the client service, the SQL sidebar, the browser, the renderer. */
const plugins: JupyterFrontEndPlugin<unknown>[] = [
  clientPlugin,
  sidebarPlugin,
  browserPlugin,
  rendererPlugin
];

export default plugins;
