// When to try again after a failed or lost connection: exponential steps capped at 30 s with
// full jitter (a uniformly random wait up to the step), so that the clients of a restarted
// server come back spread over the step instead of in one second.

/** The steps, in milliseconds; the last one repeats. */
export const STEPS_MS: readonly number[] = [1000, 2000, 4000, 8000, 16000, 30000];

/** A connection that stayed up this long resets the schedule. */
export const STABLE_MS = 10_000;

/** A server that is draining (`1001`) is left within this long: another one takes over. */
export const SOON_MS = 1000;

export class Backoff {
  private attempt = 0;

  constructor(private readonly random: () => number = Math.random) {}

  /** The wait before the next attempt; each call moves one step up. */
  next(): number {
    const step = STEPS_MS[Math.min(this.attempt, STEPS_MS.length - 1)] ?? 0;
    this.attempt += 1;
    return Math.floor(this.random() * step);
  }

  /** A short jittered wait that leaves the schedule where it is. */
  soon(): number {
    return Math.floor(this.random() * SOON_MS);
  }

  reset(): void {
    this.attempt = 0;
  }
}
