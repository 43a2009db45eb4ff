import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, WidgetTracker } from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';

import { DatasetBrowser } from './browser';
import { dicomlakeIcon } from './sidebar';
import { IDatasetBrowserOpener, IDicomlakeClient, IFilters } from './tokens';
import { ViewerPanel } from './viewer';

/** Command IDs of the dataset browser. */
export namespace CommandIDs {
  export const open = 'dicomlake:open-browser';
}

/** The dataset browser as a main-area panel (command, launcher card, palette). */
export const browserPlugin: JupyterFrontEndPlugin<IDatasetBrowserOpener> = {
  id: '@dicomlake/jupyterlab:browser',
  description: 'Dataset browser panel: studies, series, images, find similar.',
  autoStart: true,
  requires: [IDicomlakeClient],
  optional: [ICommandPalette, ILauncher, ILayoutRestorer],
  provides: IDatasetBrowserOpener,
  activate: (
    app: JupyterFrontEnd,
    client: IDicomlakeClient,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    restorer: ILayoutRestorer | null
  ): IDatasetBrowserOpener => {
    const tracker = new WidgetTracker<MainAreaWidget<DatasetBrowser>>({ namespace: 'dicomlake-browser' });
    let count = 0;
    let viewers = 0;
    const openViewer = (studyUid: string, seriesUid?: string): void => {
      const widget = new MainAreaWidget({ content: new ViewerPanel(studyUid, seriesUid) });
      widget.id = `dicomlake-viewer-${++viewers}`;
      widget.title.label = seriesUid ? `OHIF: series …${seriesUid.slice(-8)}` : `OHIF: study …${studyUid.slice(-8)}`;
      widget.title.caption = seriesUid ? `study ${studyUid}, series ${seriesUid}` : `study ${studyUid}`;
      widget.title.icon = dicomlakeIcon;
      widget.title.closable = true;
      app.shell.add(widget, 'main');
      app.shell.activateById(widget.id);
    };
    app.commands.addCommand(CommandIDs.open, {
      label: 'Dataset Browser',
      caption: 'Browse the studies, series and images of the lake',
      icon: dicomlakeIcon,
      execute: args => {
        const content = new DatasetBrowser(client, (args.filters as IFilters | undefined) ?? {}, openViewer);
        const widget = new MainAreaWidget({ content });
        widget.id = `dicomlake-browser-${++count}`;
        widget.title.label = 'dicomlake browser';
        widget.title.icon = dicomlakeIcon;
        widget.title.closable = true;
        void tracker.add(widget);
        app.shell.add(widget, 'main');
        app.shell.activateById(widget.id);
        void content.start();
        return widget;
      }
    });
    palette?.addItem({ command: CommandIDs.open, category: 'dicomlake' });
    launcher?.add({ command: CommandIDs.open, category: 'Other', rank: 1 });
    if (restorer) {
      void restorer.restore(tracker, { command: CommandIDs.open, name: () => 'dicomlake-browser' });
    }
    return {
      open: (filters?: IFilters) => {
        void app.commands.execute(CommandIDs.open, { filters: { ...filters } });
      }
    };
  }
};
