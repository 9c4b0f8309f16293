/* An example tb-agent source plugin: temperatures from the kernel's hwmon sysfs interface
 * (Documentation/hwmon/sysfs-interface.rst), with a simulated reading where the machine has no
 * hwmon temperature sensor (a container, a VM). docs/plugins.md walks through this file.
 *
 * Options (the source's `options:` map in /etc/tb-agent.yaml):
 *   chip:     the hwmon chip's name (/sys/class/hwmon/hwmonN/name), e.g. coretemp; default: the
 *             first chip that has a temperature input
 *   simulate: true = never read sysfs, always simulate (default false)
 *   root:     the hwmon class directory (default /sys/class/hwmon; for tests)
 * Readings: temp1, temp2, ... in degrees Celsius (double), one per tempN_input of the chip, and
 * simulated (bool).
 *
 * Build: cc -shared -fPIC $(pkg-config --cflags tb-agent-plugin) -o hwmon.so hwmon.c
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <tb-agent/source_plugin.h>

#define MAX_INPUTS 16

struct hwmon {
  const tb_host_api* api; /* the host's functions, valid until destroy */
  tb_host* host;          /* passed back to every one of them */
  char dir[512];          /* the chip's directory; empty = simulate */
  char keys[MAX_INPUTS][16];
  int inputs[MAX_INPUTS]; /* N of each tempN_input */
  int count;
};

/* Reads a small sysfs attribute. sysfs answers at once, so this does not block the loop. */
static int read_attr(const char* path, char* buf, size_t len) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  ssize_t n = read(fd, buf, len - 1);
  int err = errno;
  close(fd);
  if (n < 0) return -err;
  buf[n] = '\0';
  buf[strcspn(buf, "\n")] = '\0';
  return 0;
}

/* Finds the chip (by name, or the first with temperature inputs) and its tempN_input files. */
static int find_chip(struct hwmon* h, const char* root, const char* chip) {
  DIR* d = opendir(root);
  if (!d) return -errno;
  struct dirent* e;
  while ((e = readdir(d)) != NULL && h->count == 0) {
    char path[600], name[64];
    if (e->d_name[0] == '.') continue;
    snprintf(path, sizeof path, "%s/%s/name", root, e->d_name);
    if (read_attr(path, name, sizeof name) < 0) continue;
    if (chip && strcmp(chip, name) != 0) continue;
    snprintf(h->dir, sizeof h->dir, "%s/%s", root, e->d_name);
    for (int n = 1; n <= 32 && h->count < MAX_INPUTS; ++n) {
      char value[32];
      snprintf(path, sizeof path, "%s/temp%d_input", h->dir, n);
      if (read_attr(path, value, sizeof value) < 0) continue;
      h->inputs[h->count] = n;
      snprintf(h->keys[h->count], sizeof h->keys[0], "temp%d", n);
      ++h->count;
    }
  }
  closedir(d);
  if (h->count == 0) h->dir[0] = '\0';
  return 0;
}

static int hwmon_create(const tb_host_api* api, tb_host* host, void** instance, char* err,
                        size_t errlen) {
  struct hwmon* h = calloc(1, sizeof *h);
  const char *root = "/sys/class/hwmon", *chip = NULL;
  int simulate = 0;
  char msg[600];
  if (!h) return -ENOMEM;
  h->api = api;
  h->host = host;
  /* Options are typed: a wrong type is -EINVAL, an absent one -ENOENT (keep the default). */
  if (api->option_string(host, "root", &root) == -EINVAL ||
      api->option_string(host, "chip", &chip) == -EINVAL ||
      api->option_bool(host, "simulate", &simulate) == -EINVAL) {
    snprintf(err, errlen, "options: root and chip are strings, simulate is true or false");
    free(h);
    return -EINVAL;
  }
  if (!simulate) find_chip(h, root, chip);
  if (h->count == 0 && chip && !simulate) {
    /* The operator asked for this chip: its absence is an error, not a silent simulation. */
    snprintf(err, errlen, "no hwmon chip named '%s' with temperature inputs in %s", chip, root);
    free(h);
    return -ENODEV;
  }
  if (h->count > 0)
    snprintf(msg, sizeof msg, "reading %d temperature input(s) of %s", h->count, h->dir);
  else if (simulate)
    snprintf(msg, sizeof msg, "simulating a temperature (options.simulate)");
  else
    snprintf(msg, sizeof msg, "no hwmon temperature sensor in %s: simulating one", root);
  api->log(host, TB_LOG_INFO, msg);
  *instance = h;
  return 0;
}

/* One collection: emit the readings, return TB_COLLECT_DONE. Never blocks. */
static int hwmon_collect(void* instance) {
  struct hwmon* h = instance;
  tb_reading r[MAX_INPUTS + 1];
  size_t n = 0;
  memset(r, 0, sizeof r);
  if (h->count == 0) {
    /* Simulated: a slow wave around 40 degrees, so a dashboard shows something alive. */
    double t = (double)h->api->now_ms(h->host) / 1000.0;
    r[n].size = sizeof r[n];
    r[n].type = TB_VALUE_DOUBLE;
    r[n].key = "temp1";
    r[n++].value.d = 40.0 + 5.0 * sin(t / 60.0);
  }
  for (int i = 0; i < h->count; ++i) {
    char path[600], value[32], *end;
    snprintf(path, sizeof path, "%s/temp%d_input", h->dir, h->inputs[i]);
    int e = read_attr(path, value, sizeof value);
    if (e < 0) return e; /* the sensor went away: this collection fails with its errno */
    long milli = strtol(value, &end, 10);
    if (end == value) return -EIO;
    r[n].size = sizeof r[n];
    r[n].type = TB_VALUE_DOUBLE;
    r[n].key = h->keys[i];
    r[n++].value.d = milli / 1000.0; /* hwmon reports millidegrees Celsius */
  }
  r[n].size = sizeof r[n];
  r[n].type = TB_VALUE_BOOL;
  r[n].key = "simulated";
  r[n++].value.b = h->count == 0;
  /* ts 0 = now. The host copies the readings: stack memory is fine. */
  return h->api->emit(h->host, 0, r, n);
}

static void hwmon_destroy(void* instance) { free(instance); }

static const tb_source_plugin plugin = {
    .size = sizeof(tb_source_plugin),
    .abi_major = TB_SOURCE_PLUGIN_ABI_MAJOR,
    .abi_minor = TB_SOURCE_PLUGIN_ABI_MINOR,
    .name = "hwmon",
    .version = "1.0",
    .create = hwmon_create,
    .collect = hwmon_collect,
    .fd = NULL, /* a polled source: no fd, no on_event */
    .on_event = NULL,
    .destroy = hwmon_destroy,
};

/* The one exported symbol. Refuse a host of another major version (it would not call us anyway:
 * the version is in the symbol's name) or one whose info is shorter than ours. */
TB_PLUGIN_EXPORT const tb_source_plugin* TB_SOURCE_PLUGIN_ENTRY(const tb_host_info* info) {
  if (info->size < sizeof *info || info->abi_major != TB_SOURCE_PLUGIN_ABI_MAJOR) return NULL;
  return &plugin;
}
