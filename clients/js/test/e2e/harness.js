// The end-to-end tests' world: the real `fanfare` binary on a free port (started and killed
// by the test), a page served from another free port that loads the built client, tokens
// minted like a backend would, and headless Chromium (Debian's, through playwright-core).
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before } from "node:test";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");
export const SECRET = "e2e-test-secret";
export const API_KEY = "e2e-api-key";
/** How long any single wait may take. */
export const DEADLINE_MS = 15_000;
const BIN = process.env.FANFARE_BIN ?? join(root, "..", "..", "target", "debug", "fanfare");

/** Waits until `check` returns something other than undefined/false, or fails after the
 * deadline. */
export async function waitFor(what, check) {
  const end = Date.now() + DEADLINE_MS;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A running server with the tests' secret and key (and `env`: `FANFARE_<SECTION>__<KEY>`
 * overrides); `listen` defaults to a free port. */
export async function startServer(extraToml = "", listen = "127.0.0.1:0", env = {}) {
  const dir = mkdtempSync(join(tmpdir(), "fanfare-e2e-"));
  const config = join(dir, "fanfare.toml");
  writeFileSync(
    config,
    `[server]\nlisten = "${listen}"\nshutdown_timeout_ms = 2000\n[auth]\nhs256_secret = "${SECRET}"\n` +
      `[publish]\napi_keys = ["${API_KEY}"]\n[log]\nlevel = "info"\n${extraToml}`,
  );
  return spawnServer(["serve", "--config", config], env);
}

/** A running server on its embedded defaults (development secret: the demo is there). */
export function startEmbedded() {
  return spawnServer(["serve"], { FANFARE_SERVER__LISTEN: "127.0.0.1:0" });
}

async function spawnServer(args, env) {
  const child = spawn(BIN, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...env },
  });
  const logs = [];
  const exited = () => child.exitCode !== null || child.signalCode !== null;
  for (const stream of [child.stdout, child.stderr]) {
    stream.setEncoding("utf8");
    stream.on("data", (chunk) => logs.push(...chunk.split("\n")));
  }
  const addr = await waitFor("the listening log line", () => {
    if (exited()) throw new Error(`fanfare exited: ${logs.join("\n")}`);
    const line = logs.find((l) => l.includes("listening"));
    return line?.match(/addr=([0-9.:]+)/)?.[1];
  });
  return {
    addr,
    url: `http://${addr}`,
    logs,
    kill(signal = "SIGKILL") {
      child.kill(signal);
      return new Promise((r) => (exited() ? r() : child.once("exit", r)));
    },
  };
}

/** Waits until `server` is ready (`/readyz`: with Redis, connected). */
export function ready(server) {
  return waitFor("readyz 200", async () => (await fetch(`${server.url}/readyz`)).status === 200);
}

/** Publishes `events` of tenant `t1` and returns the answer's body; a `503` (an instance whose
 * Redis link is not up yet) is retried, as PROTOCOL.md asks of a backend. */
export async function publish(server, events) {
  return waitFor("a publish accepted", async () => {
    const r = await fetch(`${server.url}/v1/publish`, {
      method: "POST",
      headers: { Authorization: `Bearer ${API_KEY}` },
      body: JSON.stringify({ tenantId: "t1", events }),
    });
    if (r.status === 503) return undefined;
    if (r.status !== 202) throw new Error(`publish: ${r.status} ${await r.text()}`);
    return r.json();
  });
}

const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");

/** An HS256 token for `user` of tenant `t1`, as the app's backend mints it; with `cid`, a
 * subscription token for that conversation. */
export function token(user, ttlS = 3600, cid = undefined) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: user, tid: "t1", iat: now, exp: now + ttlS, ...(cid ? { cid } : {}) };
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

/** Serves the built client and a blank page, and `/token?user=u&ttl=s&cid=c` as the app's
 * backend would (every call counted in `tokens`). */
export async function startPages() {
  const tokens = [];
  const http = createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    if (url.pathname === "/token") {
      const user = url.searchParams.get("user") ?? "u1";
      tokens.push(user);
      res.writeHead(200, { "content-type": "text/plain" });
      const ttl = Number(url.searchParams.get("ttl") ?? 3600);
      return res.end(token(user, ttl, url.searchParams.get("cid") ?? undefined));
    }
    if (url.pathname.startsWith("/dist/")) {
      try {
        const body = readFileSync(join(root, url.pathname));
        res.writeHead(200, { "content-type": "text/javascript" });
        return res.end(body);
      } catch {
        res.writeHead(404);
        return res.end();
      }
    }
    res.writeHead(200, { "content-type": "text/html" });
    res.end("<!doctype html><title>fanfare e2e</title>");
  });
  await new Promise((r) => http.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${http.address().port}`, tokens, close: () => http.close() };
}

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox"],
    headless: true,
  });
}

/** A page of `pages` (a new one, or `page`) with the client loaded as `window.Fanfare`, and
 * a `window.seen` log of what the app was told. */
export async function openPage(browser, pages, page = undefined) {
  page ??= await browser.newPage();
  page.on("pageerror", (e) => console.error("page error:", e));
  await page.goto(pages.url);
  await page.evaluate(async () => {
    window.Fanfare = (await import("/dist/index.js")).Fanfare;
    window.seen = [];
  });
  return page;
}

/** The browser and the page server of a test file: started before its tests, stopped after. */
export function world() {
  const w = {};
  before(async () => {
    w.browser = await launch();
    w.pages = await startPages();
  });
  after(async () => {
    await w.browser?.close();
    w.pages?.close();
  });
  return w;
}
