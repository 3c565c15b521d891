// The client as the app sees it: one connection to Fanfare that reconnects by itself, restores
// every subscription after a reconnect (recovering missed events with `since` where the
// server keeps history), keeps its token fresh, and tells the app what happened.
//
// Invariants: at most one link at a time; every timer belongs to the current link or to the
// wait before the next one, and `disconnect()` clears them all. A conversation's events reach
// the app once and in offset order: anything at or below the position already delivered is
// dropped, and a gap the server could not fill reaches the app as `reload`.

import { afterClose } from "./decide.js";
import { Backoff, STABLE_MS } from "./backoff.js";
import { Chooser, FALLBACK_ORDER } from "./chooser.js";
import {
  type ClientEvent,
  type ErrorCode,
  type PresenceEvent,
  type PublishedEvent,
  type ServerEvent,
  type Since,
  isPublished,
  parseServerEvent,
} from "./protocol.js";
import { type Link, type TransportName, TRANSPORTS } from "./transport.js";

export interface Options {
  /** The server, `http(s)://host:port`. */
  url: string;
  /** A fresh token for this user (asked before connecting and before it expires). */
  getToken: () => Promise<string>;
  /** Transports to try, in order (default: websocket, sse, poll). */
  transports?: TransportName[];
  /** At most one typing event per conversation this often (default 1000, the server's). */
  typingThrottleMs?: number;
  /** For tests: the source of jitter. */
  random?: () => number;
}

export type State = "connecting" | "connected" | "disconnected";

export interface StateChange {
  state: State;
  /** Why the last connection ended, once one did. */
  code?: number;
  reason?: string;
}

export interface ClientError {
  code: ErrorCode | "connect_failed" | "no_token";
  message: string;
}

/** Why a conversation must be reloaded from the app's backend: events may have been missed. */
export interface Reload {
  conversationId: string;
  reason: "not_recovered" | "new_epoch";
}

type Listener<T> = (value: T) => void;

/** A tiny typed event emitter. */
class Emitter<M> {
  private listeners = new Map<keyof M, Set<Listener<never>>>();

  on<K extends keyof M>(name: K, fn: Listener<M[K]>): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(fn as Listener<never>);
    return () => set.delete(fn as Listener<never>);
  }

  protected emit<K extends keyof M>(name: K, value: M[K]): void {
    for (const fn of this.listeners.get(name) ?? []) (fn as Listener<M[K]>)(value);
  }
}

interface SubscriptionEvents {
  event: PublishedEvent;
  reload: Reload;
  /** The server confirmed the subscription: events published from now on arrive. */
  subscribed: { recovered: boolean };
  /** The subscription was restored after a reconnect (`recovered`: nothing was missed). */
  resubscribed: { recovered: boolean };
}

export interface SubscribeOptions {
  /** A subscription token for this conversation, asked on every (re)subscribe: needed when the
   * server's `auth.subscribe_policy` is "token" (private conversations). */
  token?: () => Promise<string>;
}

/** One conversation the app listens to; it outlives reconnects. */
export class Subscription extends Emitter<SubscriptionEvents> {
  /** The last offset delivered, in its epoch (with history on). */
  position: Since | undefined;

  constructor(
    readonly conversationId: string,
    readonly options: SubscribeOptions,
    private readonly leave: (s: Subscription) => void,
  ) {
    super();
  }

  unsubscribe(): void {
    this.leave(this);
  }

  /** @internal */
  deliver(event: PublishedEvent): void {
    const at = this.position;
    if (typeof event.offset === "number") {
      if (typeof event.epoch === "string" && at && event.epoch !== at.epoch) {
        this.emit("reload", { conversationId: this.conversationId, reason: "new_epoch" });
      } else if (at && event.offset <= at.offset && event.epoch === undefined) {
        return; // Already delivered.
      }
      this.position = { offset: event.offset, epoch: event.epoch ?? at?.epoch ?? "" };
    }
    this.emit("event", event);
  }

  /** @internal */
  acked(ack: { offset?: number; epoch?: string; recovered?: boolean }, resubscribe: boolean): void {
    if (ack.recovered === false) {
      this.emit("reload", { conversationId: this.conversationId, reason: "not_recovered" });
    }
    if (typeof ack.offset === "number" && typeof ack.epoch === "string") {
      this.position = { offset: ack.offset, epoch: ack.epoch };
    }
    const recovered = ack.recovered !== false;
    this.emit("subscribed", { recovered });
    if (resubscribe) this.emit("resubscribed", { recovered });
  }
}

interface ClientEvents {
  state: StateChange;
  error: ClientError;
  presence: PresenceEvent;
}

/** How long a link may take to reach `session.ready` before its transport is skipped. */
const OPEN_TIMEOUT_MS = 5000;

export class Fanfare extends Emitter<ClientEvents> {
  private readonly options: Options;
  private readonly backoff: Backoff;
  private readonly chooser: Chooser;
  /** The current link missed the open deadline. */
  private timedOut = false;
  private readonly subscriptions = new Map<string, Subscription>();
  private link: Link | undefined;
  private token: string | undefined;
  private state: State = "disconnected";
  private wanted = false;
  private ready = false;
  private readyAt = 0;
  private connects = 0;
  private requests = 0;
  private lastHeard = 0;
  private timers: ReturnType<typeof setTimeout>[] = [];
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private lastTyping = new Map<string, number>();
  private watching: string[] | undefined;
  /** `presence()` calls waiting for their snapshot, by request id. */
  private snapshots = new Map<string, { resolve: Listener<string[]>; reject: Listener<Error> }>();
  private readonly onOnline = () => this.retryNow();
  private readonly onOffline = () => this.link?.close(1000, "the browser went offline");

  constructor(options: Options) {
    super();
    this.options = options;
    this.backoff = new Backoff(options.random);
    let memory: Storage | undefined;
    try {
      memory = globalThis.sessionStorage;
    } catch {
      // Denied (a sandboxed frame): nothing is remembered.
    }
    this.chooser = new Chooser(options.transports ?? FALLBACK_ORDER, memory);
  }

  /** The transport in use, or to be tried next. */
  get transport(): TransportName {
    return this.chooser.current();
  }

  /** Connects, and keeps connecting until `disconnect()`. */
  connect(): void {
    if (this.wanted) return;
    this.wanted = true;
    globalThis.addEventListener?.("online", this.onOnline);
    globalThis.addEventListener?.("offline", this.onOffline);
    void this.attempt(true);
  }

  /** Closes the connection and stops reconnecting; subscriptions are kept for `connect()`. */
  disconnect(): void {
    this.wanted = false;
    globalThis.removeEventListener?.("online", this.onOnline);
    globalThis.removeEventListener?.("offline", this.onOffline);
    clearTimeout(this.retryTimer);
    this.clearLinkTimers();
    const link = this.link;
    this.link = undefined;
    link?.close(1000, "client disconnect");
    this.ready = false;
    this.failPending();
    this.setState({ state: "disconnected", code: 1000, reason: "client disconnect" });
  }

  /** Requests of the link that ended get no answer. */
  private failPending(): void {
    for (const { reject } of this.snapshots.values()) reject(new Error("disconnected"));
    this.snapshots.clear();
  }

  /** Receives `conversationId`'s events from now on, across reconnects. */
  subscribe(conversationId: string, options: SubscribeOptions = {}): Subscription {
    const held = this.subscriptions.get(conversationId);
    if (held) return held;
    const sub = new Subscription(conversationId, options, (s) => this.leave(s));
    this.subscriptions.set(conversationId, sub);
    if (this.ready) void this.sendSubscribe(sub, false);
    return sub;
  }

  /** With the server's `presence.mode = "watch"`: hear only of these users' presence (the
   * list replaces the previous one and is sent again after every reconnect). */
  watch(userIds: string[]): void {
    this.watching = [...userIds];
    this.send({ type: "presence.watch", userIds: this.watching });
  }

  /** Tells the conversation's other subscribers that this user is typing (throttled). */
  typing(conversationId: string): void {
    const now = Date.now();
    const throttle = this.options.typingThrottleMs ?? 1000;
    if (now - (this.lastTyping.get(conversationId) ?? -Infinity) < throttle) return;
    this.lastTyping.set(conversationId, now);
    this.send({ type: "presence.activity", activity: "typing", conversationId });
  }

  /** The users of the tenant online now (cluster-wide). */
  presence(): Promise<string[]> {
    return new Promise((resolve, reject) => {
      if (!this.ready) return reject(new Error("not connected"));
      const id = this.nextId("p");
      this.snapshots.set(id, { resolve, reject });
      this.send({ type: "presence.query", id });
    });
  }

  private leave(sub: Subscription): void {
    if (this.subscriptions.get(sub.conversationId) !== sub) return;
    this.subscriptions.delete(sub.conversationId);
    this.send({ type: "unsubscribe", conversationId: sub.conversationId });
  }

  private send(event: ClientEvent): void {
    if (this.ready) this.link?.send(event);
  }

  private nextId(kind: string): string {
    this.requests += 1;
    return `${kind}${this.requests}`;
  }

  private setState(change: StateChange): void {
    if (change.state === this.state && change.state !== "disconnected") return;
    this.state = change.state;
    this.emit("state", change);
  }

  private isOffline(): boolean {
    return globalThis.navigator?.onLine === false;
  }

  /** Opens a link, with a fresh token when `refresh`. */
  private async attempt(refresh: boolean): Promise<void> {
    if (!this.wanted) return;
    if (this.isOffline()) return; // The `online` event retries.
    this.setState({ state: "connecting" });
    if (refresh || !this.token) {
      try {
        this.token = await this.options.getToken();
      } catch (e) {
        this.emit("error", { code: "no_token", message: String(e) });
        return this.schedule(this.backoff.next());
      }
    }
    if (!this.wanted) return;
    const connect = ++this.connects;
    const current = () => connect === this.connects && this.wanted;
    this.ready = false;
    this.timedOut = false;
    this.link = TRANSPORTS[this.chooser.current()](this.options.url, this.token, {
      message: (text) => current() && this.onMessage(text),
      close: (code, reason, opened, unusable) =>
        current() && this.onClose(code, reason, opened, unusable === true),
    });
    this.later(OPEN_TIMEOUT_MS, () => {
      if (!current() || this.ready) return;
      this.timedOut = true;
      this.link?.close(4000, "no session.ready in time");
    });
  }

  private onMessage(text: string): void {
    this.lastHeard = Date.now();
    const event = parseServerEvent(text);
    if (!event) return;
    this.route(event);
  }

  private route(event: ServerEvent): void {
    if (isPublished(event)) {
      this.subscriptions.get(event.conversationId)?.deliver(event);
      return;
    }
    switch (event.type) {
      case "session.ready":
        return this.onReady(event.heartbeatMs);
      case "ack":
        return this.onAck(event);
      case "presence.online":
      case "presence.offline":
      case "presence.typing":
        return this.emit("presence", event);
      case "presence.snapshot": {
        const answer = event.id === undefined ? undefined : this.snapshots.get(event.id);
        if (event.id !== undefined) this.snapshots.delete(event.id);
        return answer?.resolve(event.userIds);
      }
      case "error":
        if (event.code === "token_expired") void this.refreshToken();
        return this.emit("error", { code: event.code, message: event.message });
      case "pong":
        return;
    }
  }

  private pendingSubscribes = new Map<string, { sub: Subscription; resubscribe: boolean }>();

  private async sendSubscribe(sub: Subscription, resubscribe: boolean): Promise<void> {
    const link = this.link;
    const event: ClientEvent = { type: "subscribe", conversationId: sub.conversationId };
    if (sub.options.token) {
      try {
        event.token = await sub.options.token();
      } catch (e) {
        return this.emit("error", { code: "no_token", message: String(e) });
      }
    }
    // The link may have changed while the token was fetched: the next one subscribes again.
    if (link !== this.link || !this.ready) return;
    event.id = this.nextId("s");
    this.pendingSubscribes.set(event.id, { sub, resubscribe });
    if (sub.position) event.since = sub.position;
    link?.send(event);
  }

  private onAck(ack: Extract<ServerEvent, { type: "ack" }>): void {
    const pending = this.pendingSubscribes.get(ack.id);
    if (!pending) return;
    this.pendingSubscribes.delete(ack.id);
    if (this.subscriptions.get(pending.sub.conversationId) === pending.sub) {
      pending.sub.acked(ack, pending.resubscribe);
    }
  }

  private onReady(heartbeatMs: number): void {
    const again = this.readyAt > 0;
    this.ready = true;
    this.readyAt = Date.now();
    this.pendingSubscribes.clear();
    for (const sub of this.subscriptions.values()) void this.sendSubscribe(sub, again);
    if (this.watching) this.link?.send({ type: "presence.watch", userIds: this.watching });
    this.chooser.won();
    this.setState({ state: "connected" });
    this.watchLiveness(heartbeatMs);
    this.scheduleTokenRefresh();
  }

  /** Browsers hide WebSocket pings: the protocol's `ping` keeps a quiet link heard, and a link
   * silent for two heartbeats is taken for dead. */
  private watchLiveness(heartbeatMs: number): void {
    const tick = () => {
      if (Date.now() - this.lastHeard > 2 * heartbeatMs) {
        this.link?.close(4000, "the server went silent");
        return;
      }
      this.send({ type: "ping" });
      this.later(heartbeatMs, tick);
    };
    this.later(heartbeatMs, tick);
  }

  private scheduleTokenRefresh(): void {
    const exp = tokenExpiry(this.token);
    if (exp === undefined) return;
    const left = exp - Date.now();
    // A minute early, or halfway through what is left when that is later (short tokens).
    this.later(Math.max(0, left - 60_000, left / 2), () => void this.refreshToken());
  }

  private async refreshToken(): Promise<void> {
    try {
      const token = await this.options.getToken();
      this.token = token;
      this.send({ type: "auth", token });
      this.link?.retoken(token);
      this.scheduleTokenRefresh();
    } catch (e) {
      this.emit("error", { code: "no_token", message: String(e) });
    }
  }

  private onClose(code: number, reason: string, opened: boolean, unusable: boolean): void {
    this.clearLinkTimers();
    const wasReady = this.ready && opened;
    const lasted = wasReady ? Date.now() - this.readyAt : 0;
    this.ready = false;
    this.link = undefined;
    this.failPending();
    this.setState({ state: "disconnected", code, reason });
    if (!this.wanted) return;
    if (lasted >= STABLE_MS) this.backoff.reset();
    if (wasReady) this.chooser.lost();
    // Another transport is tried at once; the same one after the backoff. One that cannot
    // work here, or did not open in time, says nothing about the token.
    const skip = unusable || this.timedOut;
    const moved = !wasReady && this.chooser.failed(skip);
    if (moved && skip) return this.schedule(0);
    const decision = afterClose(code, wasReady);
    const wait = moved ? 0 : decision.wait === "soon" ? this.backoff.soon() : this.backoff.next();
    if (!decision.refresh) return this.schedule(wait);
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(async () => {
      try {
        this.token = await this.options.getToken();
      } catch (e) {
        if (decision.fatalWithoutToken) {
          this.wanted = false;
          return this.emit("error", { code: "no_token", message: String(e) });
        }
        this.emit("error", { code: "no_token", message: String(e) });
        return this.schedule(this.backoff.next());
      }
      void this.attempt(false);
    }, wait);
  }

  private schedule(wait: number): void {
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => void this.attempt(false), wait);
  }

  /** The browser is back online: try at once instead of waiting out the backoff. */
  private retryNow(): void {
    if (!this.wanted || this.link) return;
    clearTimeout(this.retryTimer);
    void this.attempt(true);
  }

  private later(ms: number, fn: () => void): void {
    this.timers.push(setTimeout(fn, ms));
  }

  private clearLinkTimers(): void {
    for (const t of this.timers) clearTimeout(t);
    this.timers = [];
  }
}

/** A JWT's `exp` in milliseconds, if it has one. */
function tokenExpiry(token: string | undefined): number | undefined {
  const payload = token?.split(".")[1];
  if (!payload) return undefined;
  try {
    const json = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
    const exp = (JSON.parse(json) as { exp?: unknown }).exp;
    return typeof exp === "number" ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}
