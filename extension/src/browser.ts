import { Widget } from '@lumino/widgets';

import { cellText, copyText, errorMessage, h } from './dom';
import {
  IBrowseRecord,
  IBrowseResult,
  IDicomlakeClient,
  IFilters,
  IImageSearchResult,
  IUploadJob,
  IUploadSummary
} from './tokens';

const STUDY_PAGE = 25;
const INSTANCE_PAGE = 48;
const NEIGHBOURS = 12;

/* Rows of the browse actions: the columns the browser reads of what the server's SQL
   selects (extension/browse_sql.py). */

/** A filter choice (`facets_sql`). */
interface IFacetRecord {
  value: string;
  series: number;
}

/** A study (`studies_sql`). */
interface IStudyRecord {
  study_instance_uid: string;
  study_date: string | null;
  patient_name: string | null;
  patient_id: string | null;
  study_description: string | null;
  modalities: string[] | null;
  series: number;
  instances: number;
}

/** A series with its first image's thumbnail (`series_sql`). */
interface ISeriesRecord {
  series_instance_uid: string;
  series_number: number | null;
  series_description: string | null;
  modality: string | null;
  body_part_examined: string | null;
  instances: number;
  thumbnail: string | null;
}

/** An instance of a series page (`instances_sql`). */
interface IInstanceRecord {
  sop_instance_uid: string;
  instance_number: number | null;
  rows: number | null;
  columns: number | null;
  thumbnail: string | null;
}

/** Every column of one instance (`instance_sql`: `i.*`); only these two are used by name. */
interface IInstanceDetail extends IBrowseRecord {
  thumbnail: string | null;
  meta?: string | null;
}

/** A neighbour found by `image_knn` (`similar_sql`). */
interface INeighbourRecord {
  rank: number;
  distance: number;
  sop_instance_uid: string;
  modality: string | null;
  body_part_examined: string | null;
  thumbnail: string | null;
}

/** A thumbnail `<img>` from a base64 PNG column (or a placeholder when it is NULL). */
function thumbnail(base64: string | null, alt: string): HTMLElement {
  if (!base64) {
    return h('div', { className: 'jp-DicomlakeBrowser-noThumb', text: 'no image', title: alt });
  }
  const img = h('img', { className: 'jp-DicomlakeBrowser-thumb', attrs: { alt, src: `data:image/png;base64,${base64}` } });
  img.title = alt;
  return img;
}

/**
 * The dataset browser: studies > series > instances with thumbnails, filters, a detail
 * view, "find similar" (image_knn) and upload. Each action is one statement at the SQL
 * endpoint, listed in the SQL log with a copy button, so anything seen here can be re-run
 * in the sidebar or a notebook.
 */
export class DatasetBrowser extends Widget {
  /**
   * `openViewer` shows a study (a series first, when given) in the OHIF viewer; without it
   * the browser offers no viewer button.
   */
  constructor(
    private _client: IDicomlakeClient,
    filters: IFilters = {},
    private _openViewer?: (studyUid: string, seriesUid?: string) => void
  ) {
    super();
    this.addClass('jp-DicomlakeBrowser');
    this.title.label = 'dicomlake browser';
    this.title.closable = true;

    this._modality = h('select', { className: 'jp-DicomlakeBrowser-modality jp-mod-styled', attrs: { 'aria-label': 'Modality' } });
    this._bodyPart = h('select', { className: 'jp-DicomlakeBrowser-bodyPart jp-mod-styled', attrs: { 'aria-label': 'Body part' } });
    this._dateFrom = h('input', { className: 'jp-DicomlakeBrowser-dateFrom jp-mod-styled', attrs: { type: 'date', 'aria-label': 'Study date from' } });
    this._dateTo = h('input', { className: 'jp-DicomlakeBrowser-dateTo jp-mod-styled', attrs: { type: 'date', 'aria-label': 'Study date to' } });
    this._text = h('input', { className: 'jp-DicomlakeBrowser-text jp-mod-styled', attrs: { type: 'search', placeholder: 'patient, description, accession…', 'aria-label': 'Free text' } });
    this._setOptions(this._modality, 'any modality', filters.modality ? [filters.modality] : []);
    this._setOptions(this._bodyPart, 'any body part', filters.bodyPart ? [filters.bodyPart] : []);
    this._modality.value = filters.modality ?? '';
    this._bodyPart.value = filters.bodyPart ?? '';
    this._dateFrom.value = filters.dateFrom ?? '';
    this._dateTo.value = filters.dateTo ?? '';
    this._text.value = filters.text ?? '';
    for (const input of [this._modality, this._bodyPart, this._dateFrom, this._dateTo]) {
      input.addEventListener('change', () => void this.search());
    }
    this._text.addEventListener('keydown', event => {
      if (event.key === 'Enter') {
        void this.search();
      }
    });
    const apply = h('button', { className: 'jp-DicomlakeBrowser-apply jp-mod-styled jp-mod-accept', text: 'Search' });
    apply.addEventListener('click', () => void this.search());
    this._fileInput = h('input', { className: 'jp-DicomlakeBrowser-file', attrs: { type: 'file', multiple: '' } });
    this._fileInput.hidden = true;
    this._fileInput.addEventListener('change', () => void this.upload(Array.from(this._fileInput.files ?? [])));
    const upload = h('button', { className: 'jp-DicomlakeBrowser-upload jp-mod-styled', text: '⤒ Upload', title: 'Add DICOM files or ZIP archives to the lake' });
    upload.addEventListener('click', () => this._fileInput.click());
    this._imageInput = h('input', { className: 'jp-DicomlakeBrowser-imageFile', attrs: { type: 'file', accept: '.dcm,.dicom,.png,.jpg,.jpeg,application/dicom,image/png,image/jpeg' } });
    this._imageInput.hidden = true;
    this._imageInput.addEventListener('change', () => {
      const file = this._imageInput.files?.[0];
      this._imageInput.value = '';
      if (file) {
        void this.searchByImage(file);
      }
    });
    const byImage = h('button', { className: 'jp-DicomlakeBrowser-searchByImage jp-mod-styled', text: '⌕ Search by image', title: 'Find the lake images most similar to a DICOM, PNG or JPEG file of yours (the file is not added to the lake; use Upload for that)' });
    byImage.addEventListener('click', () => this._imageInput.click());

    const toolbar = h('div', { className: 'jp-DicomlakeBrowser-toolbar' },
      this._modality, this._bodyPart,
      h('label', { text: 'from ' }, this._dateFrom), h('label', { text: 'to ' }, this._dateTo),
      this._text, apply, byImage, this._imageInput, upload, this._fileInput);

    this._message = h('div', { className: 'jp-DicomlakeBrowser-message' });
    this._studies = h('div', { className: 'jp-DicomlakeBrowser-studies' });
    this._series = h('div', { className: 'jp-DicomlakeBrowser-series' });
    this._instances = h('div', { className: 'jp-DicomlakeBrowser-instances' });
    this._detail = h('div', { className: 'jp-DicomlakeBrowser-detail' });
    this._similar = h('div', { className: 'jp-DicomlakeBrowser-similar' });
    this._log = h('ol', { className: 'jp-DicomlakeBrowser-sqlLog', attrs: { reversed: '' } });

    const pane = (title: string, ...children: HTMLElement[]) =>
      h('section', { className: 'jp-DicomlakeBrowser-pane' }, h('h3', { text: title }), ...children);
    this.node.append(
      toolbar,
      this._message,
      h('div', { className: 'jp-DicomlakeBrowser-main' },
        pane('Studies', this._studies),
        pane('Series and images', this._series, this._instances),
        pane('Image', this._detail, this._similar)),
      h('details', { className: 'jp-DicomlakeBrowser-sql', attrs: { open: '' } },
        h('summary', { text: 'SQL of each action' }), this._log)
    );
  }

  /** Load the filter choices, then the studies (called once when first shown). */
  async start(): Promise<void> {
    if (this._started) {
      return;
    }
    this._started = true;
    const [modalities, bodyParts] = await Promise.all([
      this._run<IFacetRecord>('filter choices: modality', 'modalities', {}),
      this._run<IFacetRecord>('filter choices: body part', 'body-parts', {})
    ]);
    if (modalities) {
      this._setOptions(this._modality, 'any modality', modalities.records.map(r => r.value));
    }
    if (bodyParts) {
      this._setOptions(this._bodyPart, 'any body part', bodyParts.records.map(r => r.value));
    }
    await this.search();
  }

  /** The filters as the server expects them. */
  get filters(): IFilters {
    const filters: IFilters = {};
    if (this._modality.value) {
      filters.modality = this._modality.value;
    }
    if (this._bodyPart.value) {
      filters.bodyPart = this._bodyPart.value;
    }
    if (this._dateFrom.value) {
      filters.dateFrom = this._dateFrom.value;
    }
    if (this._dateTo.value) {
      filters.dateTo = this._dateTo.value;
    }
    if (this._text.value.trim()) {
      filters.text = this._text.value.trim();
    }
    return filters;
  }

  /** Studies matching the filters (first page). */
  async search(offset = 0): Promise<void> {
    this._studyOffset = offset;
    const result = await this._run<IStudyRecord>('studies', 'studies', { filters: this.filters, offset, limit: STUDY_PAGE });
    this._series.replaceChildren();
    this._instances.replaceChildren();
    if (!result) {
      this._studies.replaceChildren();
      return;
    }
    const table = h('table', { className: 'jp-DicomlakeBrowser-table' });
    table.append(h('thead', {}, h('tr', {}, ...['date', 'patient', 'description', 'modalities', 'series', 'images'].map(t => h('th', { text: t })))));
    const body = h('tbody');
    for (const study of result.records) {
      const tr = h('tr', { className: 'jp-DicomlakeBrowser-study', attrs: { 'data-uid': study.study_instance_uid } },
        h('td', { text: cellText(study.study_date) }),
        h('td', { text: cellText(study.patient_name ?? study.patient_id) }),
        h('td', { text: cellText(study.study_description) }),
        h('td', { text: Array.isArray(study.modalities) ? study.modalities.join(', ') : cellText(study.modalities) }),
        h('td', { text: cellText(study.series) }),
        h('td', { text: cellText(study.instances) }));
      tr.addEventListener('click', () => {
        table.querySelectorAll('.jp-mod-selected').forEach(n => n.classList.remove('jp-mod-selected'));
        tr.classList.add('jp-mod-selected');
        void this.openStudy(study.study_instance_uid);
      });
      body.append(tr);
    }
    table.append(body);
    const prev = h('button', { className: 'jp-mod-styled', text: '‹' });
    const next = h('button', { className: 'jp-mod-styled', text: '›' });
    prev.disabled = offset === 0;
    next.disabled = result.records.length < STUDY_PAGE;
    prev.addEventListener('click', () => void this.search(Math.max(0, this._studyOffset - STUDY_PAGE)));
    next.addEventListener('click', () => void this.search(this._studyOffset + STUDY_PAGE));
    this._studies.replaceChildren(
      result.records.length ? table : h('p', { className: 'jp-DicomlakeBrowser-empty', text: 'No study matches these filters.' }),
      h('div', { className: 'jp-DicomlakeBrowser-pager' }, prev, h('span', { text: `studies ${offset + 1}–${offset + result.records.length}` }), next));
  }

  /** The series of a study, as thumbnail cards. */
  async openStudy(studyUid: string): Promise<void> {
    const result = await this._run<ISeriesRecord>('series of a study', 'series', { study: studyUid, filters: this.filters });
    this._instances.replaceChildren();
    if (!result) {
      return;
    }
    const openViewer = this._openViewer;
    const viewerButton = (title: string, seriesUid?: string) => {
      const button = h('button', { className: 'jp-DicomlakeBrowser-openViewer jp-mod-styled', text: '▣ Open in viewer', title });
      button.addEventListener('click', event => {
        event.stopPropagation();  // a series card's own click opens its images here
        openViewer?.(studyUid, seriesUid);
      });
      return button;
    };
    this._series.replaceChildren(
      ...(openViewer ? [h('div', { className: 'jp-DicomlakeBrowser-studyActions' }, viewerButton('Open this study in the OHIF viewer'))] : []),
      ...result.records.map(series => {
        const card = h('div', { className: 'jp-DicomlakeBrowser-card jp-DicomlakeBrowser-seriesCard', attrs: { 'data-uid': series.series_instance_uid }, title: series.series_instance_uid },
          thumbnail(series.thumbnail, `series ${series.series_number ?? ''}`),
          h('div', { className: 'jp-DicomlakeBrowser-caption', text: `${series.modality ?? '?'} #${series.series_number ?? '–'} · ${series.instances} img` }),
          h('div', { className: 'jp-DicomlakeBrowser-subcaption', text: cellText(series.series_description ?? series.body_part_examined) }),
          ...(openViewer ? [viewerButton('Open this series in the OHIF viewer', series.series_instance_uid)] : []));
        card.addEventListener('click', () => {
          this._series.querySelectorAll('.jp-mod-selected').forEach(n => n.classList.remove('jp-mod-selected'));
          card.classList.add('jp-mod-selected');
          void this.openSeries(series.series_instance_uid);
        });
        return card;
      })
    );
  }

  /** The instances of a series, as thumbnails. */
  async openSeries(seriesUid: string, offset = 0): Promise<void> {
    const result = await this._run<IInstanceRecord>('images of a series', 'instances', { series: seriesUid, offset, limit: INSTANCE_PAGE });
    if (!result) {
      return;
    }
    const grid = h('div', { className: 'jp-DicomlakeBrowser-grid' },
      ...result.records.map(instance => {
        const card = h('div', { className: 'jp-DicomlakeBrowser-card jp-DicomlakeBrowser-instanceCard', attrs: { 'data-uid': instance.sop_instance_uid }, title: instance.sop_instance_uid },
          thumbnail(instance.thumbnail, `instance ${instance.instance_number ?? ''}`),
          h('div', { className: 'jp-DicomlakeBrowser-caption', text: `#${instance.instance_number ?? '–'} ${instance.rows ?? '?'}×${instance.columns ?? '?'}` }));
        card.addEventListener('click', () => void this.openInstance(instance.sop_instance_uid));
        return card;
      }));
    const pager = h('div', { className: 'jp-DicomlakeBrowser-pager' });
    if (offset > 0 || result.records.length === INSTANCE_PAGE) {
      const prev = h('button', { className: 'jp-mod-styled', text: '‹' });
      const next = h('button', { className: 'jp-mod-styled', text: '›' });
      prev.disabled = offset === 0;
      next.disabled = result.records.length < INSTANCE_PAGE;
      prev.addEventListener('click', () => void this.openSeries(seriesUid, Math.max(0, offset - INSTANCE_PAGE)));
      next.addEventListener('click', () => void this.openSeries(seriesUid, offset + INSTANCE_PAGE));
      pager.append(prev, h('span', { text: `images ${offset + 1}–${offset + result.records.length}` }), next);
    }
    this._instances.replaceChildren(grid, pager);
  }

  /** The detail view of one image: larger thumbnail, columns, header tags, find similar. */
  async openInstance(sopUid: string): Promise<void> {
    const result = await this._run<IInstanceDetail>('image details', 'instance', { sop: sopUid });
    this._similar.replaceChildren();
    if (!result || result.records.length === 0) {
      this._detail.replaceChildren(h('p', { text: `No instance ${sopUid}.` }));
      return;
    }
    const record = result.records[0];
    const similar = h('button', { className: 'jp-DicomlakeBrowser-findSimilar jp-mod-styled jp-mod-accept', text: '≈ Find similar' });
    similar.addEventListener('click', () => void this.findSimilar(sopUid));
    const fields = h('table', { className: 'jp-DicomlakeBrowser-fields' });
    for (const column of result.columns) {
      if (column.name === 'thumbnail' || column.name === 'meta') {
        continue;
      }
      const value = record[column.name];
      if (value === null || value === undefined) {
        continue;
      }
      fields.append(h('tr', {}, h('th', { text: column.name }), h('td', { text: cellText(value) })));
    }
    const meta = h('details', { className: 'jp-DicomlakeBrowser-meta' }, h('summary', { text: 'All header tags (meta)' }));
    if (record.meta) {
      meta.append(h('pre', { text: this._formatMeta(record.meta) }));
    }
    this._detail.replaceChildren(
      h('div', { className: 'jp-DicomlakeBrowser-detailHead', attrs: { 'data-uid': sopUid } },
        thumbnail(record.thumbnail, sopUid), h('div', {}, h('div', { className: 'jp-DicomlakeBrowser-uid', text: sopUid }), similar)),
      fields, meta);
  }

  /** Neighbours of an image by `image_knn`, nearest first, as a thumbnail grid. */
  async findSimilar(sopUid: string): Promise<void> {
    this._similar.replaceChildren(h('p', { text: 'searching…' }));
    const result = await this._run<INeighbourRecord>('find similar (image_knn)', 'similar', { sop: sopUid, k: NEIGHBOURS });
    this._showNeighbours(result, `${result?.records.length ?? 0} most similar images, nearest first`);
  }

  /**
   * Neighbours of an image that is not in the lake (a file the user picked), shown as
   * "find similar" shows them. The file goes to the server for this one statement only;
   * adding it to the lake is the separate Upload.
   */
  async searchByImage(file: File): Promise<void> {
    this._detail.replaceChildren(h('p', { className: 'jp-DicomlakeBrowser-queryImage', text: `query image: ${file.name} (${file.size} bytes, not stored)` }));
    this._similar.replaceChildren(h('p', { text: 'searching…' }));
    const result = await this._runWith<INeighbourRecord, IImageSearchResult<INeighbourRecord>>('search by image (image_knn query_image)', () => this._client.searchByImage<INeighbourRecord>(file, NEIGHBOURS));
    if (result) {
      const sent = result.queryImage;
      this._detail.replaceChildren(h('p', { className: 'jp-DicomlakeBrowser-queryImage', attrs: { 'data-sha256': sent.sha256 }, text: `query image: ${sent.name} (${sent.bytes} bytes, sha256 ${sent.sha256.slice(0, 12)}…, sent ${sent.sent}; not stored)` }));
    }
    this._showNeighbours(result, `${result?.records.length ?? 0} lake images most similar to ${file.name}, nearest first`);
  }

  /** A neighbour grid (rank, distance, thumbnail; a click opens the image). */
  private _showNeighbours(result: IBrowseResult<INeighbourRecord> | null, heading: string): void {
    if (!result) {
      this._similar.replaceChildren();
      return;
    }
    this._similar.replaceChildren(
      h('h4', { text: heading }),
      h('div', { className: 'jp-DicomlakeBrowser-grid jp-DicomlakeBrowser-neighbours' },
        ...result.records.map(n => {
          const card = h('div', { className: 'jp-DicomlakeBrowser-card jp-DicomlakeBrowser-neighbour', attrs: { 'data-uid': n.sop_instance_uid, 'data-rank': String(n.rank), 'data-distance': String(n.distance) }, title: n.sop_instance_uid },
            thumbnail(n.thumbnail, `rank ${n.rank}`),
            h('div', { className: 'jp-DicomlakeBrowser-caption', text: `#${n.rank} d=${Number(n.distance).toFixed(3)}` }),
            h('div', { className: 'jp-DicomlakeBrowser-subcaption', text: `${n.modality ?? '?'} ${n.body_part_examined ?? ''}` }));
          card.addEventListener('click', () => void this.openInstance(n.sop_instance_uid));
          return card;
        })));
  }

  /** Upload files, follow the ingest, then show what arrived. */
  async upload(files: File[]): Promise<void> {
    this._fileInput.value = '';
    if (files.length === 0) {
      return;
    }
    this._say(`uploading ${files.length} file(s)…`);
    let job: IUploadJob;
    try {
      job = await this._client.upload(files);
    } catch (error) {
      this._say(`upload failed: ${errorMessage(error)}`, true);
      return;
    }
    const streamed = job.path === 'stream';
    if (!streamed) {
      this._logStatement('upload: ingest and embed (command on the server)', job.command);
    }
    while (job.state === 'RUNNING') {
      this._say(`${streamed ? 'sending' : 'ingesting'} ${job.files.length} file(s)… ${job.elapsedSeconds} s`);
      await new Promise(resolve => setTimeout(resolve, 2000));
      job = await this._client.uploadStatus(job.id);
    }
    if (job.state === 'FAILED') {
      this._say(`upload failed: ${job.output.slice(-3).join(' ')}`, true);
      return;
    }
    if (job.check) {
      this._logStatement('upload: what arrived', job.check.sql);
    }
    const summary: IUploadSummary = job.summary ?? {};
    const count = job.check?.records[0];
    await this.search();
    if (streamed) {
      const kinds = Object.entries(summary.not_sent_kinds ?? {}).map(([k, n]) => `${n} ${k}`);
      this._say(`sent ${summary.sent ?? 0} image(s) to the upload stream` +
        (kinds.length ? `; not sent: ${kinds.join(', ')}` : '') +
        '; the stream job adds them to the lake within seconds (search again to see them)');
      return;
    }
    this._say(`upload ingested: ${summary.rows_written ?? 0} images written, ${summary.errors_recorded ?? 0} errors, ${summary.embedded ?? 0} embedded` +
      (count ? `; the lake now has ${count.instances} images in ${count.series} series from this upload` : '') +
      (summary.embed_error ? ` (embedding: ${summary.embed_error})` : ''));
  }

  private _formatMeta(meta: string): string {
    try {
      return JSON.stringify(JSON.parse(meta), null, 1);
    } catch {
      return meta;
    }
  }

  private _setOptions(select: HTMLSelectElement, any: string, values: string[]): void {
    const current = select.value;
    select.replaceChildren(h('option', { text: any, attrs: { value: '' } }), ...values.map(v => h('option', { text: v, attrs: { value: v } })));
    select.value = values.includes(current) ? current : '';
  }

  /** Run one browse action: log its SQL, show its error if it failed. */
  private _run<R>(label: string, action: string, body: { [key: string]: unknown }): Promise<IBrowseResult<R> | null> {
    return this._runWith<R, IBrowseResult<R>>(label, () => this._client.browse<R>(action, body));
  }

  /** Run one statement-backed call: log its SQL, show its error if it failed. */
  private async _runWith<R, T extends IBrowseResult<R>>(label: string, call: () => Promise<T>): Promise<T | null> {
    this._say('');
    let result: T;
    try {
      result = await call();
    } catch (error) {
      this._say(`${label}: ${errorMessage(error)}`, true);
      return null;
    }
    this._logStatement(label, result.sql, result.error?.message);
    if (result.error) {
      const where = result.error.line ? ` (line ${result.error.line}, column ${result.error.column})` : '';
      this._say(`${label} failed: ${result.error.name}${where}: ${result.error.message}`, true);
      return null;
    }
    return result;
  }

  private _logStatement(label: string, sql: string, error?: string): void {
    const copy = h('button', { className: 'jp-DicomlakeBrowser-copy jp-mod-styled', text: 'Copy' });
    copy.addEventListener('click', () => void copyText(sql));
    const item = h('li', { className: `jp-DicomlakeBrowser-statement${error ? ' jp-mod-error' : ''}` },
      h('div', { className: 'jp-DicomlakeBrowser-statementHead' }, h('strong', { text: label }), copy),
      h('pre', { text: sql }));
    if (error) {
      item.append(h('div', { className: 'jp-DicomlakeBrowser-statementError', text: error }));
    }
    this._log.prepend(item);
    while (this._log.children.length > 30) {
      this._log.lastElementChild?.remove();
    }
  }

  private _say(text: string, error = false): void {
    this._message.textContent = text;
    this._message.classList.toggle('jp-mod-error', error);
  }

  private _modality: HTMLSelectElement;
  private _bodyPart: HTMLSelectElement;
  private _dateFrom: HTMLInputElement;
  private _dateTo: HTMLInputElement;
  private _text: HTMLInputElement;
  private _fileInput: HTMLInputElement;
  private _imageInput: HTMLInputElement;
  private _message: HTMLDivElement;
  private _studies: HTMLDivElement;
  private _series: HTMLDivElement;
  private _instances: HTMLDivElement;
  private _detail: HTMLDivElement;
  private _similar: HTMLDivElement;
  private _log: HTMLOListElement;
  private _studyOffset = 0;
  private _started = false;
}
