// What each way of losing the connection makes the client do next.
import { test } from "node:test";
import assert from "node:assert/strict";
import { afterClose } from "../../dist/index.js";

test("close codes decide the next attempt", () => {
  const cases = [
    // [code, opened, refresh, wait, fatalWithoutToken]
    [1001, true, false, "soon", false],
    [4001, true, true, "soon", false],
    [1008, true, true, "backoff", true],
    [4009, true, false, "backoff", false],
    [1013, true, false, "backoff", false],
    [1006, true, false, "backoff", false],
    [4008, true, false, "backoff", false],
    [1000, true, false, "backoff", false],
  ];
  for (const [code, opened, refresh, wait, fatalWithoutToken] of cases) {
    assert.deepEqual(afterClose(code, opened), { refresh, wait, fatalWithoutToken }, `${code}`);
  }
});

test("a connection that never opened asks for a fresh token, whatever its code", () => {
  for (const code of [1006, 1001, 4001]) {
    assert.deepEqual(afterClose(code, false), { refresh: true, wait: "backoff", fatalWithoutToken: false });
  }
  // A session refused with 401/403 (a WebSocket's refusal is 1006): an error without a token.
  assert.deepEqual(afterClose(1008, false), { refresh: true, wait: "backoff", fatalWithoutToken: true });
});
