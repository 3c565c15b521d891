// Which transport the client opens next.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Chooser, FALLBACK_ORDER, RETRY_FIRST_MS } from "../../dist/index.js";

class Memory {
  items = new Map();
  getItem(k) {
    return this.items.get(k) ?? null;
  }
  setItem(k, v) {
    this.items.set(k, v);
  }
}

test("websocket, then sse, then poll: skipped at once when unusable, after two early closes otherwise", () => {
  assert.deepEqual(FALLBACK_ORDER, ["websocket", "sse", "poll"]);
  const c = new Chooser(FALLBACK_ORDER, new Memory());
  assert.equal(c.current(), "websocket");
  assert.equal(c.failed(true), true, "unusable: the next one at once");
  assert.equal(c.current(), "sse");
  assert.equal(c.failed(false), false, "one early close: the same again, after the backoff");
  assert.equal(c.current(), "sse");
  assert.equal(c.failed(false), true);
  assert.equal(c.current(), "poll");
  c.failed(true);
  assert.equal(c.current(), "websocket", "all failed: from the start, after the backoff");
});

test("an early close between two good connections does not add up", () => {
  const c = new Chooser(FALLBACK_ORDER, new Memory());
  c.failed(false);
  c.won();
  assert.equal(c.failed(false), false);
  assert.equal(c.current(), "websocket");
});

test("the winner is remembered for the page's session, until the websocket is worth a retry", () => {
  let now = 1_000_000;
  const memory = new Memory();
  const first = new Chooser(FALLBACK_ORDER, memory, () => now);
  first.failed(true);
  first.won();
  const reloaded = new Chooser(FALLBACK_ORDER, memory, () => now);
  assert.equal(reloaded.current(), "sse", "a reload skips what was blocked");
  reloaded.lost();
  assert.equal(reloaded.current(), "sse", "a reconnect soon after stays");
  now += RETRY_FIRST_MS;
  reloaded.lost();
  assert.equal(reloaded.current(), "websocket", "later the upgrade is tried again");
  assert.equal(new Chooser(FALLBACK_ORDER, memory, () => now).current(), "websocket");
  assert.equal(new Chooser(FALLBACK_ORDER, undefined).current(), "websocket", "no storage");
});
