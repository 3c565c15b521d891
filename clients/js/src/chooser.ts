// Which transport to open next. WebSocket, then an SSE session, then long-polling, by default:
// a transport that cannot be used here (the browser lacks it) or that does not open within the
// deadline is skipped at once, one that closes before `session.ready` twice in a row is
// skipped too. The one that worked is remembered for the page's session (sessionStorage), so
// a reload does not try the blocked ones again, but only for `RETRY_FIRST_MS`: after that a
// reconnect tries the first transport (a WebSocket upgrade) again.

import type { TransportName } from "./transport.js";

export const FALLBACK_ORDER: readonly TransportName[] = ["websocket", "sse", "poll"];
export const RETRY_FIRST_MS = 5 * 60_000;
const KEY = "fanfare.transport";

/** The part of `Storage` the chooser uses. */
export interface Memory {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export class Chooser {
  private index = 0;
  private failures = 0;

  constructor(
    private readonly order: readonly TransportName[],
    private readonly memory: Memory | undefined,
    private readonly now: () => number = Date.now,
  ) {
    this.index = Math.max(0, order.indexOf(this.remembered() ?? order[0] ?? "websocket"));
  }

  private remembered(): TransportName | undefined {
    try {
      const held = JSON.parse(this.memory?.getItem(KEY) ?? "null") as {
        name?: TransportName;
        at?: number;
      } | null;
      const fresh = held?.at !== undefined && this.now() - held.at < RETRY_FIRST_MS;
      return fresh ? held?.name : undefined;
    } catch {
      return undefined;
    }
  }

  /** The transport to open next. */
  current(): TransportName {
    return this.order[this.index] ?? "websocket";
  }

  /** The current transport reached `session.ready`. */
  won(): void {
    this.failures = 0;
    try {
      this.memory?.setItem(KEY, JSON.stringify({ name: this.current(), at: this.now() }));
    } catch {
      // Storage may be full or denied: only the memory of the winner is lost.
    }
  }

  /** A connection that was up was lost: start again from the first transport once the
   * remembered winner is stale (the WebSocket upgrade is retried). */
  lost(): void {
    if (this.index > 0 && this.remembered() === undefined) this.index = 0;
  }

  /** The current transport failed before `session.ready`; `skip`: it cannot work here or
   * did not open in time. True when the next attempt uses another transport (at once, no
   * backoff), false when it tries again after the backoff (this one, or all failed). */
  failed(skip: boolean): boolean {
    this.failures += 1;
    if (!skip && this.failures < 2) return false;
    this.failures = 0;
    if (this.index + 1 < this.order.length) {
      this.index += 1;
      return true;
    }
    this.index = 0;
    return false;
  }
}
