// @fanfare/client: the browser client of the Fanfare real-time event router.
export {
  Fanfare,
  Subscription,
  type ClientError,
  type Options,
  type Reload,
  type State,
  type StateChange,
  type SubscribeOptions,
} from "./client.js";
export { Backoff, STEPS_MS, STABLE_MS, SOON_MS } from "./backoff.js";
export { afterClose, type Decision } from "./decide.js";
export { Chooser, FALLBACK_ORDER, RETRY_FIRST_MS, type Memory } from "./chooser.js";
export { CLIENT_EVENT_TYPES, SERVER_EVENT_TYPES } from "./protocol.js";
export type {
  ClientEvent,
  ErrorCode,
  PresenceEvent,
  PublishedEvent,
  ServerEvent,
  Since,
} from "./protocol.js";
export type { TransportName } from "./transport.js";
