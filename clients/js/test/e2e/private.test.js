// Private conversations (`auth.subscribe_policy = "token"`): the client asks the app for a
// subscription token on every subscribe and resubscribe.
import { test } from "node:test";
import assert from "node:assert/strict";
import { openPage, publish, startServer, waitFor, world } from "./harness.js";

const w = world();

test("subscriptions carry their tokens, again after a reconnect; one without is refused", async () => {
  const server = await startServer("", undefined, { FANFARE_AUTH__SUBSCRIBE_POLICY: "token" });
  const page = await openPage(w.browser, w.pages);
  try {
    await page.evaluate(
      (url) =>
        new Promise((subscribed) => {
          const getToken = () => fetch("/token?user=u1").then((r) => r.text());
          window.rt = new window.Fanfare({ url, getToken });
          window.rt.on("error", (e) => window.seen.push({ error: e.code }));
          const grant = () => fetch("/token?user=u1&cid=c1").then((r) => r.text());
          const sub = window.rt.subscribe("c1", { token: grant });
          sub.on("event", (e) => window.seen.push({ event: e.n }));
          sub.on("subscribed", subscribed);
          window.rt.subscribe("c2"); // no token: refused
          window.rt.connect();
        }),
      server.url,
    );
    await waitFor("c2 refused", () => page.evaluate(() => window.seen.some((s) => s.error === "forbidden")));
    await publish(server, [
      { type: "conversation.updated", conversationId: "c2", n: 0 },
      { type: "conversation.updated", conversationId: "c1", n: 1 },
    ]);
    await waitFor("c1's event", () => page.evaluate(() => window.seen.some((s) => s.event === 1)));
    const grants = () => w.pages.tokens.length;
    const before = grants();
    await page.evaluate(
      () =>
        new Promise((resubscribed) => {
          window.rt.subscribe("c1").on("resubscribed", resubscribed);
          window.rt.disconnect();
          window.rt.connect();
        }),
    );
    assert.equal(grants() - before, 2, "a connection token and c1's subscription token");
    await publish(server, [{ type: "conversation.updated", conversationId: "c1", n: 2 }]);
    await waitFor("c1's next event", () => page.evaluate(() => window.seen.some((s) => s.event === 2)));
    const events = await page.evaluate(() => window.seen.filter((s) => "event" in s).map((s) => s.event));
    assert.deepEqual(events, [1, 2], "nothing of c2");
  } finally {
    await page.close();
    await server.kill();
  }
});
