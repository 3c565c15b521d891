// The development demo page, as a newcomer opens it in two tabs on the embedded defaults.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { startEmbedded, waitFor, world } from "./harness.js";

const w = world();
let server;
before(async () => (server = await startEmbedded()));
after(() => server?.kill());

const text = (page, id) => page.evaluate((id) => document.getElementById(id).textContent, id);

test("two tabs of /demo see each other, each other's typing and messages", async () => {
  const context = await w.browser.newContext();
  // Two tabs of one browser would share sessionStorage's user only if opened from each
  // other; separate pages get separate users.
  const [a, b] = [await context.newPage(), await context.newPage()];
  try {
    for (const page of [a, b]) {
      await page.goto(`${server.url}/demo`);
      await waitFor("connected", async () => (await text(page, "status")) === "connected");
      assert.equal(await text(page, "transport"), "websocket");
    }
    const [me, other] = [await text(a, "me"), await text(b, "me")];
    assert.notEqual(me, other);
    await waitFor("a sees b online", async () => (await text(a, "online")).includes(other));
    await b.fill("input[name=text]", "hello from b");
    await waitFor("a sees b typing", async () => (await text(a, "typing")).includes(other));
    await b.press("input[name=text]", "Enter");
    await waitFor("a gets b's message", async () => (await text(a, "log")).includes(`${other}: hello from b`));
    await waitFor("the sender sees it too", async () => (await text(b, "log")).includes("hello from b"));
  } finally {
    await context.close();
  }
});
