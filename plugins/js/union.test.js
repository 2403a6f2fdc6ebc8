import assert from "node:assert/strict";
import { test } from "node:test";

import { union } from "./union.js";

const bytes = (json) => new TextEncoder().encode(json);
const text = (data) => new TextDecoder().decode(data);

test("union is sorted, without duplicates", () => {
  assert.equal(text(union(bytes('["b","a"]'), bytes('["c","a"]'))), '["a","b","c"]');
});

test("union is commutative, associative and idempotent", () => {
  const [a, b, c] = ['["x","y"]', '["z"]', '["y","w"]'].map(bytes);
  assert.deepEqual(union(a, b), union(b, a));
  assert.deepEqual(union(union(a, b), c), union(a, union(b, c)));
  const ab = union(a, b);
  assert.deepEqual(union(ab, ab), ab);
});

test("the first version is canonicalized", () => {
  assert.equal(text(union(undefined, bytes('["b","a","b"]'))), '["a","b"]');
});

test("anything but an array of strings is refused", () => {
  for (const bad of ["{}", "[1]", "nope", '["a",null]']) {
    assert.throws(() => union(undefined, bytes(bad)), `${bad}`);
  }
});
