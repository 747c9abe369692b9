// The dashboard's lint (`pnpm lint`, run by `make check`): ESLint's and typescript-eslint's recommended
// rules, type-aware (they read tsconfig.json), plus the two rules of hooks (call order, effect dependencies).
// Not react-hooks' React Compiler rules (its 7.x "recommended" set): the dashboard does not use the compiler.
import js from "@eslint/js";
import reactHooks from "eslint-plugin-react-hooks";
import globals from "globals";
import tseslint from "typescript-eslint";

export default tseslint.config(
  // Build output and the generated wire types (openapi-typescript writes src/api/schema.d.ts).
  { ignores: ["dist", "node_modules", "src/api/schema.d.ts"] },
  js.configs.recommended,
  tseslint.configs.recommendedTypeChecked,
  {
    files: ["**/*.{ts,tsx}"],
    plugins: { "react-hooks": reactHooks },
    languageOptions: {
      globals: globals.browser,
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      "react-hooks/rules-of-hooks": "error",
      "react-hooks/exhaustive-deps": "error",
      // `const { [id]: _, ...rest } = obj` drops a key: the rest sibling is the point, not `_`.
      "@typescript-eslint/no-unused-vars": ["error", { ignoreRestSiblings: true }],
    },
  },
  {
    files: ["eslint.config.js"],
    extends: [tseslint.configs.disableTypeChecked],
    languageOptions: { globals: globals.node },
  },
);
