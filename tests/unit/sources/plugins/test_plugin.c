/* Test plugins for test_plugin_source.cpp: one file, one shared object per PLUGIN_* variant. */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <tb-agent/source_plugin.h>

struct instance {
  const tb_host_api* api;
  tb_host* host;
  int64_t count;
  int efd;
  char* buffer; /* allocated per instance, so a missing destroy shows as a leak under ASan */
};

static int create(const tb_host_api* api, tb_host* host, void** out, char* err, size_t errlen) {
#ifdef PLUGIN_CREATE_FAILS
  (void)api;
  (void)host;
  (void)out;
  snprintf(err, errlen, "no sensor at /dev/imaginary");
  return -ENODEV;
#else
  (void)err;
  (void)errlen;
  struct instance* in = calloc(1, sizeof *in);
  if (!in) return -ENOMEM;
  in->api = api;
  in->host = host;
  in->efd = -1;
  in->buffer = malloc(64);
#if defined(PLUGIN_ASYNC) || defined(PLUGIN_PUSH)
  in->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
#endif
  api->log(host, TB_LOG_DEBUG, "created");
  *out = in;
  return 0;
#endif
}

static int collect(void* p) {
  struct instance* in = p;
  ++in->count;
#if defined(PLUGIN_CRASH)
  int64_t crash_after = 0; /* collections that succeed before the crash */
  in->api->option_int(in->host, "crash_after", &crash_after);
  if (in->count <= crash_after) return TB_COLLECT_DONE;
  raise(SIGSEGV);
  return -EFAULT;
#elif defined(PLUGIN_HANG)
  int64_t hang_after = 0; /* collections that succeed before the hang */
  in->api->option_int(in->host, "hang_after", &hang_after);
  if (in->count <= hang_after) return TB_COLLECT_DONE;
  for (;;) pause();
#elif defined(PLUGIN_NEVER_COMPLETES)
  return TB_COLLECT_PENDING;
#elif defined(PLUGIN_ASYNC)
  uint64_t one = 1; /* "the answer is ready": completes from on_event */
  if (write(in->efd, &one, sizeof one) != sizeof one) return -errno;
  return TB_COLLECT_PENDING;
#elif defined(PLUGIN_PUSH)
  uint64_t one = 1; /* the reading arrives later, on its own, through on_event */
  if (write(in->efd, &one, sizeof one) != sizeof one) return -errno;
  return TB_COLLECT_DONE;
#elif defined(PLUGIN_GARBAGE)
  static const char bad_utf8[] = {'k', (char)0xff, 0};
  tb_reading r = {sizeof r, TB_VALUE_INT, bad_utf8, {0}};
  r.value.i = 1;
  in->api->emit(in->host, 0, &r, 1);
  return TB_COLLECT_DONE;
#elif defined(PLUGIN_FUTURE_READING)
  /* A tb_reading of a later minor version: longer, so the array's stride is longer too. */
  struct longer {
    tb_reading r;
    int64_t added_later;
  } two[2];
  memset(two, 0, sizeof two);
  for (int k = 0; k < 2; ++k) {
    two[k].r.size = sizeof two[k];
    two[k].r.type = TB_VALUE_INT;
    two[k].r.key = k ? "second" : "first";
    two[k].r.value.i = k + 1;
    two[k].added_later = -1;
  }
  return in->api->emit(in->host, 0, &two[0].r, 2);
#elif defined(PLUGIN_FAILS)
  return -EIO;
#else
  /* good: one reading per option type, plus a counter. */
  const tb_host_api* api = in->api;
  tb_reading r[6];
  size_t n = 0;
  const char* s = NULL;
  int64_t i = 0;
  double d = 0;
  int b = 0;
  memset(r, 0, sizeof r);
  r[n].size = sizeof r[n];
  r[n].key = "count";
  r[n].type = TB_VALUE_INT;
  r[n++].value.i = in->count;
  r[n].size = sizeof r[n]; /* tells runs of the agent apart */
  r[n].key = "pid";
  r[n].type = TB_VALUE_INT;
  r[n++].value.i = getpid();
  if (api->option_string(in->host, "label", &s) == 0) {
    r[n].size = sizeof r[n];
    r[n].key = "label";
    r[n].type = TB_VALUE_STRING;
    r[n++].value.s = s;
  }
  if (api->option_int(in->host, "number", &i) == 0) {
    r[n].size = sizeof r[n];
    r[n].key = "number";
    r[n].type = TB_VALUE_INT;
    r[n++].value.i = i;
  }
  if (api->option_double(in->host, "ratio", &d) == 0) {
    r[n].size = sizeof r[n];
    r[n].key = "ratio";
    r[n].type = TB_VALUE_DOUBLE;
    r[n++].value.d = d;
  }
  if (api->option_bool(in->host, "flag", &b) == 0) {
    r[n].size = sizeof r[n];
    r[n].key = "flag";
    r[n].type = TB_VALUE_BOOL;
    r[n++].value.b = b;
  }
  int e = api->emit(in->host, 0, r, n);
  if (e < 0) return e;
  return TB_COLLECT_DONE;
#endif
}

static int fd(void* p) { return ((struct instance*)p)->efd; }

static int on_event(void* p, int efd, uint32_t events) {
  struct instance* in = p;
  uint64_t v;
  (void)events;
  if (read(efd, &v, sizeof v) != sizeof v) return 0;
  tb_reading r = {sizeof r, TB_VALUE_INT, "pushed", {0}};
  r.value.i = in->count;
  in->api->emit(in->host, 0, &r, 1);
#ifdef PLUGIN_ASYNC
  in->api->collect_done(in->host, 0, NULL);
#endif
  return 0;
}

static void destroy(void* p) {
  struct instance* in = p;
  if (in->efd >= 0) close(in->efd);
  free(in->buffer);
  free(in);
}

static const tb_source_plugin table = {sizeof(tb_source_plugin),
#ifdef PLUGIN_WRONG_TABLE_ABI
                                       2,
#else
                                       TB_SOURCE_PLUGIN_ABI_MAJOR,
#endif
                                       TB_SOURCE_PLUGIN_ABI_MINOR,
                                       "test",
                                       "1.0",
                                       create,
                                       collect,
                                       fd,
                                       on_event,
                                       destroy};

#if defined(PLUGIN_WRONG_ABI)
/* Built for a future ABI 2: exports only the v2 entry point. */
TB_PLUGIN_EXPORT const tb_source_plugin* tb_source_plugin_v2(const tb_host_info* info) {
  (void)info;
  return &table;
}
#elif defined(PLUGIN_NO_SYMBOL)
/* Exports something, but not the entry point. */
TB_PLUGIN_EXPORT int not_a_plugin(void) { return 0; }
#elif defined(PLUGIN_REFUSES)
TB_PLUGIN_EXPORT const tb_source_plugin* TB_SOURCE_PLUGIN_ENTRY(const tb_host_info* info) {
  (void)info;
  return NULL; /* "needs a newer host" */
}
#else
TB_PLUGIN_EXPORT const tb_source_plugin* TB_SOURCE_PLUGIN_ENTRY(const tb_host_info* info) {
  if (info->size < sizeof *info || info->abi_major != TB_SOURCE_PLUGIN_ABI_MAJOR) return NULL;
  return &table;
}
#endif
