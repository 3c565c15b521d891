// The wire vocabulary of docs/PROTOCOL.md, as the client sees it: the one definition of the
// events the server sends and the client sends. Every other module speaks these types.

/** A published event: the publisher's JSON, with `offset` (and `epoch` on an epoch's first
 * event) when the server keeps history. */
export interface PublishedEvent {
  type: "conversation.updated" | "message.received" | "draft.locked";
  conversationId: string;
  messageId?: string;
  userId?: string;
  offset?: number;
  epoch?: string;
  [field: string]: unknown;
}

export const PUBLISHED_TYPES: ReadonlySet<string> = new Set([
  "conversation.updated",
  "message.received",
  "draft.locked",
]);

export type PresenceEvent =
  | { type: "presence.online"; userId: string }
  | { type: "presence.offline"; userId: string }
  | { type: "presence.typing"; userId: string; conversationId: string };

export type ServerEvent =
  | PublishedEvent
  | PresenceEvent
  | {
      type: "session.ready";
      connectionId: string;
      userId: string;
      tenantId: string;
      heartbeatMs: number;
    }
  | { type: "presence.snapshot"; userIds: string[]; id?: string }
  | {
      type: "ack";
      id: string;
      offset?: number;
      epoch?: string;
      recovered?: boolean;
    }
  | { type: "error"; code: ErrorCode; message: string; id?: string }
  | { type: "pong"; id?: string };

export type ErrorCode =
  | "unauthorized"
  | "token_expired"
  | "forbidden"
  | "invalid_message"
  | "rate_limited"
  | "too_many_subscriptions"
  | "overloaded"
  | "unavailable";

/** Every server event type; the compiler checks the list against `ServerEvent` both ways, and
 * a unit test checks it against docs/PROTOCOL.md. */
export const SERVER_EVENT_TYPES = [
  "presence.online",
  "presence.offline",
  "presence.typing",
  "conversation.updated",
  "message.received",
  "draft.locked",
  "session.ready",
  "presence.snapshot",
  "ack",
  "error",
  "pong",
] as const satisfies readonly ServerEvent["type"][];
const everyServerEventListed: [Exclude<ServerEvent["type"], (typeof SERVER_EVENT_TYPES)[number]>] extends [never]
  ? true
  : false = true;
void everyServerEventListed;

/** Where a client is in a conversation's stream: the last offset it saw, in its epoch. */
export interface Since {
  offset: number;
  epoch: string;
}

export type ClientEvent =
  | { type: "subscribe"; conversationId: string; id?: string; since?: Since; token?: string }
  | { type: "unsubscribe"; conversationId: string; id?: string }
  | {
      type: "presence.activity";
      activity: "typing" | "viewing";
      conversationId?: string;
      id?: string;
    }
  | { type: "presence.query"; id?: string }
  | { type: "presence.watch"; userIds: string[]; id?: string }
  | { type: "auth"; token: string; id?: string }
  | { type: "ping"; id?: string };

/** Every client event type, checked like `SERVER_EVENT_TYPES`. */
export const CLIENT_EVENT_TYPES = [
  "subscribe",
  "unsubscribe",
  "presence.activity",
  "ping",
  "presence.query",
  "presence.watch",
  "auth",
] as const satisfies readonly ClientEvent["type"][];
const everyClientEventListed: [Exclude<ClientEvent["type"], (typeof CLIENT_EVENT_TYPES)[number]>] extends [never]
  ? true
  : false = true;
void everyClientEventListed;

/** WebSocket close codes the server uses (PROTOCOL.md, "Close codes"). */
export const Close = {
  Normal: 1000,
  GoingAway: 1001,
  Abnormal: 1006,
  Policy: 1008,
  TooBig: 1009,
  SlowConsumer: 1013,
  TokenExpired: 4001,
  RateLimited: 4008,
  HeartbeatTimeout: 4009,
} as const;

/** Parses one server message; `undefined` for anything that is not a JSON object with a
 * string `type`. */
export function parseServerEvent(text: string): ServerEvent | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof value !== "object" || value === null) return undefined;
  const type = (value as { type?: unknown }).type;
  return typeof type === "string" ? (value as ServerEvent) : undefined;
}

export function isPublished(event: ServerEvent): event is PublishedEvent {
  return PUBLISHED_TYPES.has(event.type);
}
