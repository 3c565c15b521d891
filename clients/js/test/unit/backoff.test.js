// The reconnection schedule: steps, caps, full jitter, reset.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Backoff, STEPS_MS, SOON_MS } from "../../dist/index.js";

test("each step waits at most its bound, the last one repeats", () => {
  const top = new Backoff(() => 0.999999);
  const waits = Array.from({ length: 9 }, () => top.next());
  assert.deepEqual(waits, [999, 1999, 3999, 7999, 15999, 29999, 29999, 29999, 29999]);
  const bottom = new Backoff(() => 0);
  assert.ok(Array.from({ length: 9 }, () => bottom.next()).every((w) => w === 0));
  assert.deepEqual(STEPS_MS, [1000, 2000, 4000, 8000, 16000, 30000]);
});

test("full jitter spreads a step's clients over the whole step", () => {
  const waits = Array.from({ length: 2000 }, () => new Backoff().next());
  const buckets = [0, 0, 0, 0];
  for (const w of waits) {
    assert.ok(w >= 0 && w < 1000, `${w}`);
    buckets[Math.floor(w / 250)] += 1;
  }
  // Uniform: each quarter of the step gets about a quarter of the clients.
  for (const n of buckets) assert.ok(n > 400 && n < 600, `${buckets}`);
});

test("reset starts the schedule again; soon leaves it alone", () => {
  const b = new Backoff(() => 0.5);
  b.next();
  b.next();
  assert.equal(b.soon(), SOON_MS / 2);
  assert.equal(b.next(), 2000, "the third step, soon() did not count");
  b.reset();
  assert.equal(b.next(), 500);
});
