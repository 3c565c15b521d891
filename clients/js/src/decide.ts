// What a lost connection means for the next attempt, by its close code (PROTOCOL.md, "Close
// codes"). A browser cannot see why an upgrade failed: an expired token, a foreign origin and
// a refused rate limit all look like 1006 before `open`, so that case asks for a fresh token.

import { Close } from "./protocol.js";

export interface Decision {
  /** Ask `getToken` for a fresh token before the next attempt. */
  refresh: boolean;
  /** When to try: "soon" (jittered, under a second, the schedule unchanged) or "backoff". */
  wait: "soon" | "backoff";
  /** Stop with an error when `getToken` cannot give a token. */
  fatalWithoutToken: boolean;
}

/** `opened`: the connection was established before it closed. */
export function afterClose(code: number, opened: boolean): Decision {
  if (!opened) {
    // 1008 before open: an HTTP session's 401 or 403, which a WebSocket cannot see.
    return { refresh: true, wait: "backoff", fatalWithoutToken: code === Close.Policy };
  }
  switch (code) {
    case Close.GoingAway:
      return { refresh: false, wait: "soon", fatalWithoutToken: false };
    case Close.TokenExpired:
      return { refresh: true, wait: "soon", fatalWithoutToken: false };
    case Close.Policy:
      return { refresh: true, wait: "backoff", fatalWithoutToken: true };
    default:
      // 1000 from the server, 1006, 1013, 4008, 4009 and anything unknown.
      return { refresh: false, wait: "backoff", fatalWithoutToken: false };
  }
}
