// Drops events whose subject starts with one of the configured prefixes.
//
// Config: `prefixes` — comma-separated subject prefixes, e.g.
// "debug/,telemetry/raw/". Other events are kept.
//
// `filter.h` is generated at build time by `wit-bindgen c --world filter`
// (see scripts/build-plugins.sh).

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "filter.h"

// Prefixes live for the whole instance: the config table never changes
// during an instance's life, so it is read once, on the first batch.
static filter_string_t *prefixes;
static size_t prefix_count;
static bool configured;

static void log_info(const char *message, const char *key, const filter_string_t *value) {
  filter_string_t msg;
  filter_string_set(&msg, message);
  filter_tuple2_string_string_t field;
  filter_string_set(&field.f0, key);
  field.f1 = *value;
  filter_list_tuple2_string_string_t fields = {&field, 1};
  ferry_plugin_log_log(FERRY_PLUGIN_LOG_LEVEL_INFO, &msg, &fields);
}

static bool is_space(uint8_t c) { return c == ' ' || c == '\t'; }

// Splits the `prefixes` value on commas, trimming blanks and skipping empty
// items. Keeps the host's buffer: the items point into it.
static void configure(void) {
  configured = true;
  filter_string_t key, value;
  filter_string_set(&key, "prefixes");
  if (!ferry_plugin_config_get(&key, &value)) {
    filter_string_set(&value, "");
  }
  log_info("prefix filter ready", "prefixes", &value);

  prefixes = calloc(value.len / 2 + 1, sizeof *prefixes);
  if (prefixes == NULL) abort();
  size_t start = 0;
  for (size_t i = 0; i <= value.len; i++) {
    if (i < value.len && value.ptr[i] != ',') continue;
    size_t a = start, b = i;
    while (a < b && is_space(value.ptr[a])) a++;
    while (b > a && is_space(value.ptr[b - 1])) b--;
    if (b > a) prefixes[prefix_count++] = (filter_string_t){value.ptr + a, b - a};
    start = i + 1;
  }
}

static bool dropped(const filter_string_t *subject) {
  for (size_t i = 0; i < prefix_count; i++) {
    const filter_string_t *p = &prefixes[i];
    if (subject->len >= p->len && memcmp(subject->ptr, p->ptr, p->len) == 0) return true;
  }
  return false;
}

void exports_filter_filter(filter_borrow_batch_t events, filter_list_verdict_t *ret) {
  if (!configured) configure();

  // The events stay in the host: only the subject of each is copied in, and
  // only when there is a prefix to compare it with. The host frees `ret`
  // after copying it out (post-return).
  size_t n = ferry_plugin_types_method_batch_len(events);
  ret->len = n;
  ret->ptr = NULL;
  if (n > 0) {
    ret->ptr = calloc(n, sizeof *ret->ptr);
    if (ret->ptr == NULL) abort();
  }
  for (size_t i = 0; i < n; i++) {
    bool drop = false;
    if (prefix_count > 0) {
      filter_string_t subject;
      ferry_plugin_types_method_batch_subject(events, (uint32_t)i, &subject);
      drop = dropped(&subject);
      filter_string_free(&subject);
    }
    ret->ptr[i].tag = drop ? FERRY_PLUGIN_TYPES_VERDICT_DROP : FERRY_PLUGIN_TYPES_VERDICT_KEEP;
  }
  // A borrowed handle must be released before the export returns.
  ferry_plugin_types_batch_drop_borrow(events);
}
