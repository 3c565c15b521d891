// Transports move the protocol's JSON events between the client and the server; every rule
// (subscriptions, recovery, liveness, reconnection) lives in the client above them, so the
// app's code is the same whatever carries its events. WebSocket first; where it is blocked,
// an HTTP fallback session (PROTOCOL.md) read over SSE, or by long-polling.

import type { ClientEvent } from "./protocol.js";

/** What a transport tells the client. */
export interface LinkHandlers {
  message(text: string): void;
  /** The link ended: its close code (1006 for a drop) and whether it had opened. `unusable`:
   * this transport cannot work here (the browser lacks it), try the next one at once. */
  close(code: number, reason: string, opened: boolean, unusable?: boolean): void;
}

/** One live connection to the server over some transport. */
export interface Link {
  send(event: ClientEvent): void;
  /** The token to present from now on (HTTP sessions check it on every request). */
  retoken(token: string): void;
  /** Ends the link; `close` is still reported. */
  close(code?: number, reason?: string): void;
}

export type TransportName = "websocket" | "sse" | "poll";

/** Opens a link to the server at `base` (`http(s)://host:port`) with `token`. */
export type Opener = (base: string, token: string, handlers: LinkHandlers) => Link;

/** Reports a link's end once, whoever notices first. */
function ender(handlers: LinkHandlers) {
  let ended = false;
  return (code: number, reason: string, opened: boolean, unusable = false) => {
    if (ended) return;
    ended = true;
    handlers.close(code, reason, opened, unusable);
  };
}

const websocket: Opener = (base, token, handlers) => {
  const end = ender(handlers);
  const url = new URL("/ws", base);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", token);
  let socket: WebSocket;
  try {
    socket = new WebSocket(url.toString());
  } catch (e) {
    queueMicrotask(() => end(1006, String(e), false, true));
    return { send() {}, retoken() {}, close() {} };
  }
  let opened = false;
  socket.onopen = () => (opened = true);
  socket.onmessage = (m) => {
    if (typeof m.data === "string") handlers.message(m.data);
  };
  socket.onclose = (e) => end(e.code, e.reason, opened);
  return {
    send(event) {
      if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(event));
    },
    retoken() {},
    close(code = 1000, reason = "") {
      socket.close(code, reason);
      // The page may never hear the close handshake (a dead link): report it now.
      end(code, reason, opened);
    },
  };
};

/** An HTTP fallback session: created, then read by `read` (SSE or long-poll); what the client
 * sends is posted in order, one request at a time, batched while one is in flight. */
function session(read: (s: SessionLink) => void, usable: () => boolean): Opener {
  return (base, token, handlers) => {
    const end = ender(handlers);
    if (!usable()) {
      queueMicrotask(() => end(1006, "not available in this browser", false, true));
      return { send() {}, retoken() {}, close() {} };
    }
    const link = new SessionLink(base, token, handlers, end);
    void link.create().then((ok) => ok && read(link));
    return link;
  };
}

class SessionLink implements Link {
  id: string | undefined;
  opened = false;
  ended = false;
  private outbox: ClientEvent[] = [];
  private posting = false;
  readonly abort = new AbortController();

  constructor(
    private readonly base: string,
    private token: string,
    readonly handlers: LinkHandlers,
    private readonly end: ReturnType<typeof ender>,
  ) {}

  url(endpoint: string, query: Record<string, string> = {}): string {
    const path = endpoint === "" ? `/v1/sessions/${this.id}` : `/v1/sessions/${this.id}/${endpoint}`;
    const url = new URL(this.id === undefined ? "/v1/sessions" : path, this.base);
    url.searchParams.set("token", this.token);
    for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
    return url.toString();
  }

  async create(): Promise<boolean> {
    try {
      const r = await fetch(this.url(""), { method: "POST", signal: this.abort.signal });
      if (r.status !== 201) {
        // What a WebSocket cannot tell, a session can: a refused token or origin is a policy
        // matter (a fresh token, or an error), a rate limit is an overload (the backoff).
        const code = r.status === 401 || r.status === 403 ? 1008 : r.status === 429 ? 1013 : 1006;
        this.finish(code, `session refused: ${r.status}`);
        return false;
      }
      this.id = ((await r.json()) as { sessionId: string }).sessionId;
      this.opened = true;
      return true;
    } catch (e) {
      this.finish(1006, String(e));
      return false;
    }
  }

  send(event: ClientEvent): void {
    this.outbox.push(event);
    void this.flush();
  }

  private async flush(): Promise<void> {
    if (this.posting || this.ended || this.id === undefined || this.outbox.length === 0) return;
    this.posting = true;
    const events = this.outbox;
    this.outbox = [];
    try {
      const r = await fetch(this.url("events"), {
        method: "POST",
        body: JSON.stringify(events),
        signal: this.abort.signal,
      });
      if (r.status === 404) return this.finish(1006, "the session ended");
    } catch (e) {
      return this.finish(1006, String(e));
    } finally {
      this.posting = false;
    }
    void this.flush();
  }

  retoken(token: string): void {
    this.token = token;
  }

  /** The server side is gone (or unreachable): the link ends. */
  finish(code: number, reason: string): void {
    if (this.ended) return;
    this.ended = true;
    this.abort.abort();
    this.end(code, reason, this.opened);
  }

  close(code = 1000, reason = ""): void {
    if (this.id !== undefined && !this.ended) {
      void fetch(this.url(""), { method: "DELETE" }).catch(() => {});
    }
    this.finish(code, reason);
  }
}

/** The session's stream over EventSource, which resumes a dropped stream by itself with
 * `Last-Event-ID` (nothing is lost while the session lives). */
const sse = session(
  (link) => {
    const source = new EventSource(link.url("sse"));
    link.abort.signal.addEventListener("abort", () => source.close());
    source.onmessage = (m) => link.handlers.message(m.data as string);
    source.onerror = () => {
      // CONNECTING: it is resuming by itself. CLOSED: the session answered with an error.
      if (source.readyState === EventSource.CLOSED) link.finish(1006, "the session's stream ended");
    };
  },
  () => typeof EventSource === "function",
);

/** The session's events by long-polling; a poll's cursor acknowledges what came before. */
const poll = session(
  (link) => {
    let cursor = 0;
    const loop = async () => {
      while (!link.ended) {
        try {
          const r = await fetch(link.url("poll", { cursor: String(cursor) }), {
            signal: link.abort.signal,
          });
          if (r.status !== 200) return link.finish(1006, `poll answered ${r.status}`);
          const body = (await r.json()) as { events: unknown[]; cursor: number };
          cursor = body.cursor;
          for (const event of body.events) link.handlers.message(JSON.stringify(event));
        } catch (e) {
          return link.finish(1006, String(e));
        }
      }
    };
    void loop();
  },
  () => typeof fetch === "function",
);

export const TRANSPORTS: Record<TransportName, Opener> = { websocket, sse, poll };
