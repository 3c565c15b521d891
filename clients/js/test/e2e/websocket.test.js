// The client in headless Chromium against the real binary over WebSocket: events arrive as
// published, a restarted server is reconnected to by itself, and what was missed while away
// is recovered with `since`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { STEPS_MS } from "../../dist/index.js";
import { openPage, publish, startServer, waitFor, world } from "./harness.js";

const w = world();

/** Connects the page's client as `user` and subscribes it to `c1`; resolves once subscribed. */
async function connectAndSubscribe(page, server, user = "u1") {
  await page.evaluate(
    ([url, user]) =>
      new Promise((subscribed) => {
        const getToken = () => fetch(`/token?user=${user}`).then((r) => r.text());
        window.rt = new window.Fanfare({ url, getToken });
        window.rt.on("state", (s) => window.seen.push({ state: s.state, code: s.code }));
        const sub = window.rt.subscribe("c1");
        sub.on("event", (e) => window.seen.push({ event: e }));
        sub.on("reload", (r) => window.seen.push({ reload: r.reason }));
        sub.on("resubscribed", (r) => window.seen.push({ resubscribed: r.recovered }));
        sub.on("subscribed", subscribed);
        window.rt.connect();
      }),
    [server.url, user],
  );
}

const events = (page) => page.evaluate(() => window.seen.filter((s) => s.event).map((s) => s.event));

test("published events reach the page as they were published", async () => {
  const server = await startServer();
  const page = await openPage(w.browser, w.pages);
  try {
    await connectAndSubscribe(page, server);
    const published = [
      { type: "message.received", conversationId: "c1", messageId: "m1", body: { text: "héllo" }, n: [1, 2.5] },
      { type: "conversation.updated", conversationId: "c1", extra: null },
      { type: "draft.locked", conversationId: "c1", userId: "u2" },
    ];
    await publish(server, published);
    await waitFor("three events", async () => (await events(page)).length === 3);
    assert.deepEqual(await events(page), published);
  } finally {
    await page.close();
    await server.kill();
  }
});

test("a killed and restarted server is reconnected to, and its new events arrive", async () => {
  const first = await startServer("[history]\nsize = 10\n");
  const page = await openPage(w.browser, w.pages);
  let second;
  try {
    await connectAndSubscribe(page, first);
    await publish(first, [{ type: "conversation.updated", conversationId: "c1", n: 1 }]);
    await waitFor("the first event", async () => (await events(page)).length === 1);
    await first.kill();
    const down = Date.now();
    second = await startServer("[history]\nsize = 10\n", first.addr);
    // The memory broker's history did not survive: the app is told to reload.
    await waitFor("the resubscribe", () =>
      page.evaluate(() => window.seen.some((s) => s.resubscribed !== undefined)),
    );
    // Within the schedule: at most the first three steps (1 s, 2 s, 4 s), restart included.
    const waited = Date.now() - down;
    assert.ok(waited < STEPS_MS[0] + STEPS_MS[1] + STEPS_MS[2], `reconnected after ${waited} ms`);
    const seen = await page.evaluate(() => window.seen);
    assert.ok(seen.some((s) => s.reload === "not_recovered"), JSON.stringify(seen));
    assert.ok(seen.some((s) => s.state === "disconnected" && s.code === 1006), JSON.stringify(seen));
    await publish(second, [{ type: "conversation.updated", conversationId: "c1", n: 2 }]);
    await waitFor("the event after the restart", async () => (await events(page)).length === 2);
    const [, last] = await events(page);
    assert.equal(last.n, 2);
    assert.equal(last.offset, 1, "the new epoch's first event");
  } finally {
    await page.close();
    await first.kill();
    await second?.kill();
  }
});

test("events published while away are recovered in order, once", async () => {
  const server = await startServer("[history]\nsize = 10\n");
  const page = await openPage(w.browser, w.pages);
  try {
    await connectAndSubscribe(page, server);
    const update = (n) => ({ type: "conversation.updated", conversationId: "c1", n });
    await publish(server, [update(1), update(2)]);
    await waitFor("two events", async () => (await events(page)).length === 2);
    await page.evaluate(() => window.rt.disconnect());
    await publish(server, [update(3), update(4), update(5)]);
    await page.evaluate(() => window.rt.connect());
    await waitFor("the recovery", () =>
      page.evaluate(() => window.seen.some((s) => s.resubscribed === true)),
    );
    await publish(server, [update(6)]);
    await waitFor("six events", async () => (await events(page)).length === 6);
    const got = await events(page);
    assert.deepEqual(got.map((e) => e.n), [1, 2, 3, 4, 5, 6]);
    assert.deepEqual(got.map((e) => e.offset), [1, 2, 3, 4, 5, 6]);
    const seen = await page.evaluate(() => window.seen);
    assert.ok(!seen.some((s) => s.reload), "nothing to reload");
  } finally {
    await page.close();
    await server.kill();
  }
});
