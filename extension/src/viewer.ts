import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

/**
 * The OHIF viewer page of a study (and, when given, the series to show first), served by
 * the Jupyter server (`<base_url>/dicomlake/viewer/`, extension/viewer_proxy.py). It reads
 * DICOMweb through the same server as this user's mapped SQL user, so no password is asked.
 */
export function viewerUrl(studyUid: string, seriesUid?: string): string {
  const query: Record<string, string> = { StudyInstanceUIDs: studyUid };
  if (seriesUid) {
    query.initialSeriesInstanceUID = seriesUid;
  }
  const base = ServerConnection.makeSettings().baseUrl;
  return URLExt.join(base, 'dicomlake', 'viewer', 'viewer') + URLExt.objectToQueryString(query);
}

/** OHIF in a main-area panel: one iframe, filling the panel. */
export class ViewerPanel extends Widget {
  constructor(readonly studyUid: string, readonly seriesUid?: string) {
    super();
    this.addClass('jp-DicomlakeViewer');
    this.iframe = document.createElement('iframe');
    this.iframe.className = 'jp-DicomlakeViewer-frame';
    this.iframe.title = 'OHIF viewer';
    this.iframe.src = viewerUrl(studyUid, seriesUid);
    this.node.append(this.iframe);
  }

  readonly iframe: HTMLIFrameElement;
}
