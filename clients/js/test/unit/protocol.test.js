// The client's event types are the protocol's: every `{"type":"..."}` of PROTOCOL.md's tables
// of client and server events, and nothing else.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { CLIENT_EVENT_TYPES, SERVER_EVENT_TYPES } from "../../dist/index.js";

const protocol = readFileSync(new URL("../../../../docs/PROTOCOL.md", import.meta.url), "utf8");

/** The event types of the first column of the table under `heading`. */
function typesUnder(heading) {
  const section = protocol.split(`## ${heading}`)[1].split("\n## ")[0];
  const rows = section.split("\n").filter((l) => l.startsWith("| `{"));
  const firstCells = rows.map((row) => row.slice(0, row.indexOf("` | ") + 1));
  return new Set(firstCells.flatMap((cell) => [...cell.matchAll(/\{"type":"([a-z.]+)"/g)].map((m) => m[1])));
}

test("server events match PROTOCOL.md's table", () => {
  assert.deepEqual(new Set(SERVER_EVENT_TYPES), typesUnder("Server → client events"));
});

test("client events match PROTOCOL.md's table", () => {
  assert.deepEqual(new Set(CLIENT_EVENT_TYPES), typesUnder("Client → server events"));
});
