import { Token } from '@lumino/coreutils';

import { IQueryPage } from './tokens';

/** Opens a finished sidebar query in a tab, or writes its SQL into a notebook. */
export interface IResultsOpener {
  /** A main-area tab with the query's whole buffered result (grid, CSV, chart). */
  open(query: IQueryPage): void;
  /** A notebook code cell that runs `sql` through dicomlake's Python client. */
  toNotebook(sql: string): Promise<void>;
}

/** Provided by the results plugin; the SQL sidebar takes it as optional. */
export const IResultsOpener = new Token<IResultsOpener>(
  '@dicomlake/jupyterlab:IResultsOpener',
  'Opens SQL results in a main-area grid and writes SQL into notebooks.'
);
