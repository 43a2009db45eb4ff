import { Token } from '@lumino/coreutils';

/** A column as the SQL endpoint describes it. */
export interface IColumn {
  name: string;
  type: string;
}

/** A failed statement: what went wrong and, when known, where in the SQL. */
export interface IStatementError {
  message: string;
  name: string;
  type: string;
  line: number | null;
  column: number | null;
}

/** Connection status of the Jupyter user's mapped SQL identity. */
export interface IStatus {
  jupyterUser: string;
  connected: boolean;
  endpoint?: string;
  sqlUser?: string;
  serverVersion?: string;
  canUpload?: boolean;
  error?: string;
}

/** One level of the schema tree. */
export interface ICatalogLevel {
  sql: string;
  kind: 'catalog' | 'schema' | 'table' | 'column';
  items: { name: string; type: string | null }[];
  error: IStatementError | null;
}

/** Tables (`schema.table`) and their columns, for completion. */
export interface ICompletions {
  sql: string;
  tables: { [table: string]: string[] };
  error: IStatementError | null;
}

/** A sidebar query and one page of its buffered rows. */
export interface IQueryPage {
  id: string;
  sql: string;
  state: string;
  done: boolean;
  trinoId: string | null;
  columns: IColumn[];
  offset: number;
  rows: unknown[][];
  totalRows: number;
  truncated: boolean;
  error: IStatementError | null;
  elapsedSeconds: number;
}

/** One row of a browse action: column name to its JSON value. */
export interface IBrowseRecord {
  [column: string]: unknown;
}

/**
 * A browser action's statement and its rows as records. `R` is the row shape the action's
 * SQL selects (`extension/browse_sql.py`); without it every value is `unknown` and must be
 * checked before use.
 */
export interface IBrowseResult<R = IBrowseRecord> {
  sql: string;
  columns: IColumn[];
  records: R[];
  error: IStatementError | null;
  truncated: boolean;
}

/** What a search by image sent (`ImageSearchHandler`): the image itself is never kept. */
export interface IQueryImage {
  name: string;
  bytes: number;
  sha256: string;
  /** `as uploaded`, or `frame 0 as PNG` for a DICOM file too large for one statement. */
  sent: string;
}

/** The neighbours of an image that is not in the lake. */
export interface IImageSearchResult<R = IBrowseRecord> extends IBrowseResult<R> {
  queryImage: IQueryImage;
}

/** Filters of the dataset browser. */
export interface IFilters {
  modality?: string;
  bodyPart?: string;
  dateFrom?: string;
  dateTo?: string;
  text?: string;
}

/** One input of an upload sent to the stream: sent, not sent (with why) or failed. */
export interface IUploadDelivery {
  name: string;
  status: 'sent' | 'not_sent' | 'failed';
  kind: string | null;
  error: string | null;
}

/** An upload and what takes it into the lake: the upload stream, or batch ingest. */
export interface IUploadJob {
  id: string;
  state: 'RUNNING' | 'FINISHED' | 'FAILED';
  /** `stream` while the stream job runs; `batch` (ingest + embed on the server) otherwise. */
  path: 'stream' | 'batch';
  pathReason: string;
  deliveries: IUploadDelivery[];
  folder: string;
  files: string[];
  command: string;
  output: string[];
  summary: IUploadSummary | null;
  returncode: number | null;
  elapsedSeconds: number;
  check?: IBrowseResult<{ instances: number; series: number }>;
}

/** An upload's summary (the batch ingest's, or the stream's delivery counts); only the
 * counts the browser shows are typed. */
export interface IUploadSummary {
  sent?: number;
  not_sent?: number;
  not_sent_kinds?: Record<string, number>;
  failed?: number;
  rows_written?: number;
  errors_recorded?: number;
  embedded?: number;
  embed_error?: string;
  [key: string]: unknown;
}

/** The dicomlake server extension, as the front end's plugins use it. */
export interface IDicomlakeClient {
  status(): Promise<IStatus>;
  catalog(path: string[]): Promise<ICatalogLevel>;
  completions(): Promise<ICompletions>;
  startQuery(sql: string): Promise<IQueryPage>;
  fetchPage(id: string, offset: number, limit: number, wait: number): Promise<IQueryPage>;
  cancelQuery(id: string): Promise<IQueryPage>;
  browse<R = IBrowseRecord>(
    action: string,
    body: { [key: string]: unknown }
  ): Promise<IBrowseResult<R>>;
  searchByImage<R = IBrowseRecord>(image: File, k: number): Promise<IImageSearchResult<R>>;
  upload(files: File[]): Promise<IUploadJob>;
  uploadStatus(id: string): Promise<IUploadJob>;
}

/** The client token: the sidebar, the browser and the notebook renderer share one client. */
export const IDicomlakeClient = new Token<IDicomlakeClient>(
  '@dicomlake/jupyterlab:IDicomlakeClient',
  'Calls the dicomlake server extension (SQL endpoint via the Jupyter server).'
);

/** Opens the dataset browser in the main area; the sidebar uses it to link the two. */
export interface IDatasetBrowserOpener {
  open(filters?: IFilters): void;
}

export const IDatasetBrowserOpener = new Token<IDatasetBrowserOpener>(
  '@dicomlake/jupyterlab:IDatasetBrowserOpener',
  'Opens the dicomlake dataset browser as a main-area panel.'
);
