/**
 * What the results tab does to values, kept free of DOM so each rule is in one place: how
 * two cells compare when a column is sorted, and how rows become CSV (download) and TSV
 * (clipboard).
 */
import { cellText } from './dom';
import { IColumn } from './tokens';

/** Trino types whose values sort and chart as numbers (decimals arrive as text). */
const NUMERIC_TYPE = /^(tinyint|smallint|integer|int|bigint|real|double|decimal)\b/;
const TEMPORAL_TYPE = /^(date|timestamp|time)\b/;

/** True when the column's values are numbers, whatever JSON type carries them. */
export function isNumericType(type: string): boolean {
  return NUMERIC_TYPE.test(type.toLowerCase());
}

/** True for dates, times and timestamps (sent as ISO text by the endpoint). */
export function isTemporalType(type: string): boolean {
  return TEMPORAL_TYPE.test(type.toLowerCase());
}

const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: 'base' });

function isNull(value: unknown): boolean {
  return value === null || value === undefined;
}

/**
 * Compares two non-NULL values of one column. Numeric columns compare as numbers (so
 * 64 < 512 < 1024, decimals sent as text too); other columns compare their text with digit
 * runs as numbers (`IM9` before `IM10`), the order a person expects.
 */
function compareValues(a: unknown, b: unknown, numeric: boolean): number {
  if (numeric || (typeof a === 'number' && typeof b === 'number')) {
    const x = Number(a);
    const y = Number(b);
    if (!Number.isNaN(x) && !Number.isNaN(y)) {
      return x < y ? -1 : x > y ? 1 : 0;
    }
  }
  return collator.compare(cellText(a), cellText(b));
}

/**
 * The row indices of `rows` ordered by column `index`. NULLs go last in both directions
 * (as Trino's default `NULLS LAST`); equal values keep their original order, so sorting a
 * result that had an `ORDER BY` refines it rather than shuffling ties.
 */
export function sortedOrder(
  rows: readonly (readonly unknown[])[],
  index: number,
  column: IColumn,
  descending: boolean
): number[] {
  const numeric = isNumericType(column.type);
  const sign = descending ? -1 : 1;
  return rows
    .map((_, i) => i)
    .sort((i, j) => {
      const a = rows[i][index];
      const b = rows[j][index];
      if (isNull(a) || isNull(b)) {
        return (isNull(a) ? 1 : 0) - (isNull(b) ? 1 : 0) || i - j;
      }
      return sign * compareValues(a, b, numeric) || i - j;
    });
}

/**
 * One field of a delimited line: quoted (RFC 4180: doubled quotes inside) when it holds the
 * delimiter, a quote or a line break. NULL is an empty field; an empty string is `""`, so
 * the two stay apart for tools that care.
 */
function field(value: unknown, delimiter: string): string {
  if (isNull(value)) {
    return '';
  }
  const text = cellText(value);
  if (text === '' || text.includes(delimiter) || /["\r\n]/.test(text)) {
    return `"${text.replace(/"/g, '""')}"`;
  }
  return text;
}

function delimited(
  columns: IColumn[] | null,
  rows: Iterable<readonly unknown[]>,
  delimiter: string
): string {
  const lines: string[] = [];
  if (columns) {
    lines.push(columns.map(c => field(c.name, delimiter)).join(delimiter));
  }
  for (const row of rows) {
    lines.push(row.map(v => field(v, delimiter)).join(delimiter));
  }
  return lines.map(line => line + '\r\n').join('');
}

/** RFC 4180 CSV: a header line, then one CRLF-terminated record per row. */
export function csvText(columns: IColumn[], rows: Iterable<readonly unknown[]>): string {
  return delimited(columns, rows, ',');
}

/**
 * Tab-separated text for the clipboard, quoted the way spreadsheets write and read it, so
 * a pasted cell with a tab or line break stays one cell. `columns` adds a header line.
 */
export function tsvText(columns: IColumn[] | null, rows: Iterable<readonly unknown[]>): string {
  return delimited(columns, rows, '\t');
}
