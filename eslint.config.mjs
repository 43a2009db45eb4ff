// Lint for the JupyterLab extension's TypeScript (extension/src). Type-aware rules catch what
// tsc does not: promises nobody awaits (a failed request vanishes without a message in the
// sidebar), `any` leaking out of JSON responses, needless assertions. Interfaces follow the
// JupyterLab convention (`IDicomlakeClient`), which names tokens and their interfaces alike.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  {
    ignores: ['extension/lib/', 'extension/labextension/', 'node_modules/', 'build/']
  },
  {
    files: ['extension/src/**/*.ts'],
    extends: [js.configs.recommended, ...tseslint.configs.recommendedTypeChecked],
    languageOptions: {
      parserOptions: {
        projectService: true,
        tsconfigRootDir: import.meta.dirname
      }
    },
    rules: {
      '@typescript-eslint/naming-convention': [
        'error',
        { selector: 'interface', format: ['PascalCase'], prefix: ['I'] }
      ],
      // `namespace CommandIDs { export const open = ... }` is JupyterLab's convention.
      '@typescript-eslint/no-namespace': 'off',
      eqeqeq: ['error', 'smart'],
      curly: ['error', 'all']
    }
  }
);
