// Parse an AsyncAPI document with the maintained parser (@asyncapi/parser, locked in package.json)
// and print its diagnostics as one JSON array on stdout: {severity, code, message, path}.
// severity: "error", "warning", "info" or "hint". Exit 0 when it ran (the caller judges the
// diagnostics), 2 on a usage error. Used by tests/test_asyncapi.py.
"use strict";

const { Parser, fromFile } = require("@asyncapi/parser");

const SEVERITY = ["error", "warning", "info", "hint"];

async function main() {
  const file = process.argv[2];
  if (!file) {
    process.stderr.write("usage: node asyncapi-validate.js <asyncapi.yaml>\n");
    process.exit(2);
  }
  const parser = new Parser();
  const { diagnostics } = await fromFile(parser, file).parse();
  const out = diagnostics.map((d) => ({
    severity: SEVERITY[d.severity] ?? String(d.severity),
    code: String(d.code),
    message: d.message,
    path: d.path.join("/"),
  }));
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
