// Set-union rules of the gset merge, kept free of WIT imports so they test
// with `node --test` on the host.

const decoder = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

/** Parses a grow-only set: a JSON array of strings. Throws a message on anything else. */
export function parseSet(bytes) {
  let value;
  try {
    value = JSON.parse(decoder.decode(bytes));
  } catch (e) {
    throw `not a JSON array of strings: ${e.message ?? e}`;
  }
  if (!Array.isArray(value) || !value.every((item) => typeof item === "string")) {
    throw "not a JSON array of strings";
  }
  return value;
}

/**
 * The union of two sets as canonical JSON bytes (sorted by code unit, no
 * duplicates), so every replica converges to identical bytes whatever the
 * order in which it merged.
 */
export function union(current, incoming) {
  const merged = new Set(current === undefined ? [] : parseSet(current));
  for (const item of parseSet(incoming)) merged.add(item);
  const sorted = [...merged].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  return encoder.encode(JSON.stringify(sorted));
}
