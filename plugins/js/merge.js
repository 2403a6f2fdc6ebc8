// Grow-only set merge: the state is a JSON array of strings (tags, alarm ids
// acknowledged anywhere) and concurrent versions merge to their union, which
// is commutative, associative and idempotent. No config.

import { log } from "ferry:plugin/log@0.1.0";
import { union } from "./union.js";

/**
 * Exported as the `merge` world's `merge` function. Returning gives `ok`;
 * throwing a string gives `err` with that message.
 */
export function merge(key, current, incoming) {
  try {
    return union(current?.data, incoming.data);
  } catch (reason) {
    log("warn", "cannot merge", [["key", key], ["reason", String(reason)]]);
    throw `state ${JSON.stringify(key)}: ${reason}`;
  }
}
