import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';

import { requestAPI } from './handler';
import {
  IBrowseRecord,
  IBrowseResult,
  ICatalogLevel,
  ICompletions,
  IDicomlakeClient,
  IImageSearchResult,
  IQueryPage,
  IStatus,
  IUploadJob
} from './tokens';

const json = (body: unknown): RequestInit => ({
  method: 'POST',
  body: JSON.stringify(body),
  headers: { 'Content-Type': 'application/json' }
});

/** The one implementation of `IDicomlakeClient`: thin calls to the server routes. */
export class DicomlakeClient implements IDicomlakeClient {
  status(): Promise<IStatus> {
    return requestAPI<IStatus>('status');
  }

  catalog(path: string[]): Promise<ICatalogLevel> {
    const names = ['catalog', 'schema', 'table'];
    const query = path
      .map((part, i) => `${names[i]}=${encodeURIComponent(part)}`)
      .join('&');
    return requestAPI<ICatalogLevel>(`catalog${query ? '?' + query : ''}`);
  }

  completions(): Promise<ICompletions> {
    return requestAPI<ICompletions>('completions');
  }

  startQuery(sql: string): Promise<IQueryPage> {
    return requestAPI<IQueryPage>('queries', json({ sql }));
  }

  fetchPage(id: string, offset: number, limit: number, wait: number): Promise<IQueryPage> {
    return requestAPI<IQueryPage>(
      `queries/${id}?offset=${offset}&limit=${limit}&wait=${wait}`
    );
  }

  cancelQuery(id: string): Promise<IQueryPage> {
    return requestAPI<IQueryPage>(`queries/${id}`, { method: 'DELETE' });
  }

  browse<R = IBrowseRecord>(
    action: string,
    body: { [key: string]: unknown }
  ): Promise<IBrowseResult<R>> {
    return requestAPI<IBrowseResult<R>>(`browse/${action}`, json(body));
  }

  searchByImage<R = IBrowseRecord>(image: File, k: number): Promise<IImageSearchResult<R>> {
    const form = new FormData();
    form.append('image', image, image.name);
    form.append('k', String(k));
    return requestAPI<IImageSearchResult<R>>('image-search', { method: 'POST', body: form });
  }

  upload(files: File[]): Promise<IUploadJob> {
    const form = new FormData();
    for (const file of files) {
      form.append('files', file, file.name);
    }
    return requestAPI<IUploadJob>('uploads', { method: 'POST', body: form });
  }

  uploadStatus(id: string): Promise<IUploadJob> {
    return requestAPI<IUploadJob>(`uploads/${id}`);
  }
}

/** Provides `IDicomlakeClient`. */
export const clientPlugin: JupyterFrontEndPlugin<IDicomlakeClient> = {
  id: '@dicomlake/jupyterlab:client',
  description: 'Client of the dicomlake server extension.',
  autoStart: true,
  provides: IDicomlakeClient,
  activate: (app: JupyterFrontEnd): IDicomlakeClient => {
    void app;
    return new DicomlakeClient();
  }
};
