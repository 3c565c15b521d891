// Where WebSockets are blocked the client falls back to an SSE session, and where SSE is
// missing too, to long-polling: the app's code and what it receives are the same.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { openPage, publish, startServer, waitFor, world } from "./harness.js";

const w = world();
let server;
before(async () => (server = await startServer("[history]\nsize = 10\n")));
after(() => server?.kill());

/** A page where the given browser features do not exist. */
async function pageWithout(features) {
  const page = await w.browser.newPage();
  await page.addInitScript((names) => {
    for (const name of names) Object.defineProperty(window, name, { value: undefined });
  }, features);
  return openPage(w.browser, w.pages, page);
}

async function carriesEvents(page, conversation) {
  await page.evaluate(
    ([url, conversation]) =>
      new Promise((subscribed) => {
        const getToken = () => fetch("/token?user=u1").then((r) => r.text());
        window.rt = new window.Fanfare({ url, getToken });
        const sub = window.rt.subscribe(conversation);
        sub.on("event", (e) => window.seen.push(e));
        sub.on("subscribed", subscribed);
        window.rt.connect();
      }),
    [server.url, conversation],
  );
  const published = [
    { type: "message.received", conversationId: conversation, messageId: "m1", text: "line\nbreak" },
    { type: "conversation.updated", conversationId: conversation },
  ];
  await publish(server, published);
  await waitFor("two events", () => page.evaluate(() => window.seen.length === 2));
  const got = await page.evaluate(() => window.seen);
  assert.deepEqual(
    got.map(({ offset, epoch, ...event }) => event),
    published,
  );
  assert.deepEqual(got.map((e) => e.offset), [1, 2]);
  return page.evaluate(() => window.rt.transport);
}

test("without WebSocket the client runs over an SSE session", async () => {
  const page = await pageWithout(["WebSocket"]);
  try {
    assert.equal(await carriesEvents(page, "over-sse"), "sse");
  } finally {
    await page.close();
  }
});

test("without WebSocket and EventSource it long-polls", async () => {
  const page = await pageWithout(["WebSocket", "EventSource"]);
  try {
    assert.equal(await carriesEvents(page, "over-poll"), "poll");
  } finally {
    await page.close();
  }
});

test("a refused session whose token getToken cannot renew stops with an error", async () => {
  const page = await pageWithout(["WebSocket"]);
  try {
    const asked = w.pages.tokens.length;
    await page.evaluate((url) => {
      let calls = 0;
      // An expired token, then nothing: the backend will not renew it.
      const getToken = () =>
        calls++ === 0
          ? fetch("/token?user=u1&ttl=-60").then((r) => r.text())
          : Promise.reject(new Error("signed out"));
      window.rt = new window.Fanfare({ url, getToken });
      window.rt.on("error", (e) => window.seen.push({ error: e.code }));
      window.rt.on("state", (s) => window.seen.push({ state: s.state, code: s.code }));
      window.rt.connect();
    }, server.url);
    await waitFor("the error", () => page.evaluate(() => window.seen.some((s) => s.error)));
    const seen = await page.evaluate(() => window.seen);
    assert.deepEqual(seen.filter((s) => s.error), [{ error: "no_token" }]);
    assert.ok(seen.some((s) => s.code === 1008), JSON.stringify(seen));
    // Stopped: no more attempts (each would ask for a token and connect again).
    await new Promise((r) => setTimeout(r, 1500)); // longer than the first backoff step
    assert.equal(w.pages.tokens.length, asked + 1, "one token fetched, no retry");
    assert.deepEqual(await page.evaluate(() => window.seen), seen, "nothing happened since");
    assert.equal(await page.evaluate(() => window.rt.transport), "sse");
  } finally {
    await page.close();
  }
});
