import {
  autocompletion,
  closeBrackets,
  CompletionContext,
  CompletionResult,
  completionKeymap
} from '@codemirror/autocomplete';
import { defaultKeymap, history, historyKeymap } from '@codemirror/commands';
import { SQLNamespace, StandardSQL, sql } from '@codemirror/lang-sql';
import { bracketMatching, syntaxHighlighting } from '@codemirror/language';
import { Compartment, EditorSelection, EditorState } from '@codemirror/state';
import {
  EditorView,
  keymap,
  lineNumbers,
  placeholder,
  Decoration,
  DecorationSet
} from '@codemirror/view';
import { StateEffect, StateField } from '@codemirror/state';
import { jupyterHighlightStyle, jupyterTheme } from '@jupyterlab/codemirror';
import { Widget } from '@lumino/widgets';

/** Marks the place a failed statement points at (line, column of the error). */
const setErrorMark = StateEffect.define<{ from: number; to: number } | null>();

const errorMarkField = StateField.define<DecorationSet>({
  create: () => Decoration.none,
  update(marks, tr) {
    marks = marks.map(tr.changes);
    for (const effect of tr.effects) {
      if (effect.is(setErrorMark)) {
        marks = effect.value
          ? Decoration.set([
              Decoration.mark({ class: 'jp-DicomlakeSql-errorMark' }).range(
                effect.value.from,
                effect.value.to
              )
            ])
          : Decoration.none;
      }
    }
    if (tr.docChanged) {
      marks = Decoration.none;
    }
    return marks;
  },
  provide: field => EditorView.decorations.from(field)
});

/**
 * The SQL editor: CodeMirror 6 with SQL highlighting (JupyterLab's theme) and completion of
 * keywords, tables and columns. `setSchema` swaps the completion schema in place when the
 * server's table list arrives or changes.
 */
export class SqlEditor extends Widget {
  constructor(options: { onRun: () => void; initial?: string }) {
    super();
    this.addClass('jp-DicomlakeSql-editor');
    const run = (): boolean => {
      options.onRun();
      return true;
    };
    this._view = new EditorView({
      parent: this.node,
      state: EditorState.create({
        doc: options.initial ?? '',
        extensions: [
          lineNumbers(),
          history(),
          closeBrackets(),
          bracketMatching(),
          placeholder('SELECT … (Shift+Enter runs)'),
          this._language.of(this._sqlLanguage({})),
          syntaxHighlighting(jupyterHighlightStyle),
          jupyterTheme,
          autocompletion({ activateOnTyping: true }),
          errorMarkField,
          keymap.of([
            { key: 'Shift-Enter', run },
            { key: 'Mod-Enter', run },
            ...completionKeymap,
            ...defaultKeymap,
            ...historyKeymap
          ]),
          EditorView.lineWrapping
        ]
      })
    });
  }

  /** The statement text. */
  get value(): string {
    return this._view.state.doc.toString();
  }

  set value(text: string) {
    this._view.dispatch({
      changes: { from: 0, to: this._view.state.doc.length, insert: text }
    });
  }

  /** Insert text at the cursor (a name from the schema tree) and focus the editor. */
  insert(text: string): void {
    const range = this._view.state.selection.main;
    this._view.dispatch({
      changes: { from: range.from, to: range.to, insert: text },
      selection: EditorSelection.cursor(range.from + text.length)
    });
    this._view.focus();
  }

  /** Tables (`schema.table`) and their columns for completion. */
  setSchema(tables: { [table: string]: string[] }): void {
    this._tables = tables;
    const schema: SQLNamespace = {};
    for (const [qualified, columns] of Object.entries(tables)) {
      const [schemaName, table] = qualified.split('.');
      const inner = (schema[schemaName] ?? {}) as { [name: string]: SQLNamespace };
      inner[table] = columns;
      schema[schemaName] = inner;
    }
    this._view.dispatch({
      effects: this._language.reconfigure(this._sqlLanguage(schema))
    });
  }

  /** Underline the token at a 1-based line and column (from a statement error). */
  markError(line: number | null, column: number | null): void {
    const doc = this._view.state.doc;
    if (!line || line < 1 || line > doc.lines) {
      this._view.dispatch({ effects: setErrorMark.of(null) });
      return;
    }
    const info = doc.line(line);
    const from = Math.min(info.from + Math.max(0, (column ?? 1) - 1), info.to);
    const word = /^[\w."]+/.exec(doc.sliceString(from, info.to));
    const to = Math.min(info.to, from + Math.max(1, word ? word[0].length : 1));
    this._view.dispatch({
      effects: setErrorMark.of(to > from ? { from, to } : null),
      selection: EditorSelection.cursor(from)
    });
  }

  focus(): void {
    this._view.focus();
  }

  dispose(): void {
    if (!this.isDisposed) {
      this._view.destroy();
    }
    super.dispose();
  }

  private _sqlLanguage(schema: SQLNamespace) {
    return [
      sql({ dialect: StandardSQL, schema, defaultSchema: 'dicom', upperCaseKeywords: true }),
      StandardSQL.language.data.of({ autocomplete: this._columns })
    ];
  }

  /**
   * Unqualified column names (`WHERE patient_na`), which lang-sql only completes after
   * `table.`: the columns of the tables the statement names, or of every table if none.
   */
  private _columns = (context: CompletionContext): CompletionResult | null => {
    const word = context.matchBefore(/\w+/);
    if (!word || (word.from === word.to && !context.explicit)) {
      return null;
    }
    const before = context.state.sliceDoc(Math.max(0, word.from - 1), word.from);
    if (before === '.' || before === '"') {
      return null;
    }
    const text = context.state.doc.toString().toLowerCase();
    const named = Object.keys(this._tables).filter(t =>
      new RegExp(`\\b${t.replace('.', '\\.')}\\b|\\b(from|join)\\s+${t.split('.')[1]}\\b`).test(text)
    );
    const tables = named.length ? named : Object.keys(this._tables);
    const seen = new Set<string>();
    const options = [];
    for (const table of tables) {
      for (const column of this._tables[table]) {
        if (!seen.has(column)) {
          seen.add(column);
          options.push({ label: column, type: 'property', detail: table, boost: named.length ? 1 : 0 });
        }
      }
    }
    return { from: word.from, options, validFor: /^\w*$/ };
  };

  private _tables: { [table: string]: string[] } = {};

  private _view: EditorView;
  private _language = new Compartment();
}
