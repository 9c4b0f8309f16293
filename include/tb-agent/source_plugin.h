/* tb-agent source plugins: the C ABI (docs/plugins.md is the author's guide).
 *
 * A plugin is a shared object that exports one function, TB_SOURCE_PLUGIN_ENTRY_NAME
 * ("tb_source_plugin_v1"): the ABI major version is in the name, so a plugin built for another
 * major version is refused before any of its code runs. The entry point receives the host's
 * version and returns a table of entry points, or NULL to refuse the host.
 *
 * Rules of the boundary:
 *  - only C types cross; errors are negative errno values;
 *  - every struct that crosses starts with its own size, so both sides can grow it by appending
 *    fields (a minor version): read a field only when the size says it is there;
 *  - strings passed either way are valid during the call only: copy what you keep;
 *  - everything runs on the agent's single event loop thread: no call may block (read a sysfs
 *    attribute, yes; wait on a network, no: use fd/on_event or a thread of your own, and call
 *    the host only from the loop thread, i.e. from inside create/collect/on_event);
 *  - build with -fvisibility=hidden and export only the entry point (TB_PLUGIN_EXPORT).
 */
#ifndef TB_AGENT_SOURCE_PLUGIN_H
#define TB_AGENT_SOURCE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TB_SOURCE_PLUGIN_ABI_MAJOR 1
#define TB_SOURCE_PLUGIN_ABI_MINOR 0
#define TB_SOURCE_PLUGIN_ENTRY tb_source_plugin_v1
#define TB_SOURCE_PLUGIN_ENTRY_NAME "tb_source_plugin_v1"

#if defined(__GNUC__)
#define TB_PLUGIN_EXPORT __attribute__((visibility("default")))
#else
#define TB_PLUGIN_EXPORT
#endif

/* The host's side of one plugin instance. Opaque: pass it back to the tb_host_api functions. */
typedef struct tb_host tb_host;

/* What the host tells the entry point about itself. */
typedef struct tb_host_info {
  uint32_t size;      /* sizeof(tb_host_info) as the host knows it */
  uint32_t abi_major; /* TB_SOURCE_PLUGIN_ABI_MAJOR of the host */
  uint32_t abi_minor; /* the host implements every minor version up to this one */
  const char* agent_version;
} tb_host_info;

typedef enum tb_value_type {
  TB_VALUE_BOOL = 1,
  TB_VALUE_INT = 2,    /* int64_t */
  TB_VALUE_DOUBLE = 3, /* finite only */
  TB_VALUE_STRING = 4  /* UTF-8, at most TB_MAX_STRING_VALUE bytes */
} tb_value_type;

/* Limits the host enforces on emitted readings; anything beyond is refused as garbage. */
#define TB_MAX_KEY 256
#define TB_MAX_STRING_VALUE 4096
#define TB_MAX_READINGS 256 /* per emit call and per collection */

/* One telemetry reading. Set `size` to sizeof(tb_reading); in an array every element has the same
 * size, and the host steps through the array by readings[0].size (so a later, longer tb_reading
 * still works with an older host). */
typedef struct tb_reading {
  uint32_t size;
  uint32_t type;   /* tb_value_type */
  const char* key; /* non-empty UTF-8, at most TB_MAX_KEY bytes */
  union {
    int b; /* TB_VALUE_BOOL: 0 or 1 */
    int64_t i;
    double d;
    const char* s;
  } value;
} tb_reading;

/* Log levels (syslog's numbers). */
typedef enum tb_log_level {
  TB_LOG_ERROR = 3,
  TB_LOG_WARNING = 4,
  TB_LOG_INFO = 6,
  TB_LOG_DEBUG = 7
} tb_log_level;

/* The type of an option from the source's `options:` map in the YAML configuration. */
typedef enum tb_option_type {
  TB_OPTION_ABSENT = 0,
  TB_OPTION_NULL = 1,
  TB_OPTION_BOOL = 2,
  TB_OPTION_INT = 3,
  TB_OPTION_DOUBLE = 4,
  TB_OPTION_STRING = 5,
  TB_OPTION_LIST = 6,
  TB_OPTION_MAP = 7
} tb_option_type;

/* What the host offers. Valid from create until destroy returns. */
typedef struct tb_host_api {
  uint32_t size; /* sizeof(tb_host_api) as the host knows it */

  /* A line in the agent's log, tagged with the source's name. */
  void (*log)(tb_host* host, int level, const char* message);

  /* Readings taken at ts_ms (Unix ms; 0 = now). Inside collect, or before collect_done, they
   * join the running collection; at any other time (from on_event) they are sent as their own
   * record. Returns 0, or -EINVAL when a reading is malformed (nothing of the call is kept, and
   * the agent logs what was wrong), -E2BIG over TB_MAX_READINGS. */
  int (*emit)(tb_host* host, int64_t ts_ms, const tb_reading* readings, size_t count);

  /* Ends a collection that collect answered with TB_COLLECT_PENDING: status 0, or a negative
   * errno with `message` (may be NULL) saying why. Once per pending collection; a call for a
   * collection the host already gave up on (timeout) is ignored. */
  void (*collect_done)(tb_host* host, int status, const char* message);

  /* Wall clock, Unix ms. */
  int64_t (*now_ms)(tb_host* host);

  /* The source's `options:` map, top-level keys. option_type tells what `key` holds. The
   * getters return 0 and set *out, -ENOENT for an absent key, -EINVAL for another type
   * (option_double accepts an int; option_string's *out is valid until destroy). */
  int (*option_type)(tb_host* host, const char* key);
  int (*option_bool)(tb_host* host, const char* key, int* out);
  int (*option_int)(tb_host* host, const char* key, int64_t* out);
  int (*option_double)(tb_host* host, const char* key, double* out);
  int (*option_string)(tb_host* host, const char* key, const char** out);
  /* The index-th key of the options map (in file order), NULL past the end. Valid until
   * destroy. Lists and maps below the top level are for future minor versions. */
  const char* (*option_key)(tb_host* host, size_t index);
} tb_host_api;

/* collect's answers besides a negative errno. */
#define TB_COLLECT_DONE 0    /* finished: what was emitted during the call is the collection */
#define TB_COLLECT_PENDING 1 /* the plugin calls collect_done later (from on_event) */

/* What the plugin offers. A static const table is the usual way. */
typedef struct tb_source_plugin {
  uint32_t size;      /* sizeof(tb_source_plugin) */
  uint32_t abi_major; /* TB_SOURCE_PLUGIN_ABI_MAJOR the plugin was built against */
  uint32_t abi_minor; /* TB_SOURCE_PLUGIN_ABI_MINOR the plugin was built against */
  const char* name;   /* for messages, e.g. "hwmon" */
  const char* version;

  /* Builds one instance for one configured source. Keep `api` and `host`. On failure return a
   * negative errno and write a sentence into err (errlen bytes, NUL-terminated). */
  int (*create)(const tb_host_api* api, tb_host* host, void** instance, char* err, size_t errlen);

  /* One collection: emit readings, then return TB_COLLECT_DONE; or TB_COLLECT_PENDING and call
   * collect_done later; or a negative errno (readings emitted so far are dropped). Never blocks.
   * The host does not call collect again while one is pending. */
  int (*collect)(void* instance);

  /* Optional (NULL): a file descriptor the host watches for push sources or asynchronous
   * completion; called once after create. -1 = none. The plugin owns and closes it. */
  int (*fd)(void* instance);
  /* Optional: the fd is readable (events: EPOLLIN etc.). Negative errno disables the fd. */
  int (*on_event)(void* instance, int fd, uint32_t events);

  /* Frees the instance. Called exactly once per successful create, never during a call. */
  void (*destroy)(void* instance);
} tb_source_plugin;

/* The entry point: return the table (which must outlive the instance), or NULL to refuse a host
 * that is too old (info->abi_minor lower than what the plugin needs). */
typedef const tb_source_plugin* (*tb_source_plugin_entry)(const tb_host_info* info);

TB_PLUGIN_EXPORT const tb_source_plugin* TB_SOURCE_PLUGIN_ENTRY(const tb_host_info* info);

#ifdef __cplusplus
}
#endif

#endif /* TB_AGENT_SOURCE_PLUGIN_H */
