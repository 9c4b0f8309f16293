#include "sources/plugin_source.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include <spdlog/spdlog.h>
#include <tb-agent/source_plugin.h>

#include "sources/source_type.hpp"
#include "sources/text.hpp"
#include "util/clock.hpp"
#include "util/log.hpp"
#include "util/units.hpp"
#include "util/utf8.hpp"

// The host side of one instance, as the plugin sees it: opaque, handed back to every host call.
struct tb_host {
  tb::sources::PluginSource::Impl* impl;
};

namespace tb::sources {

namespace {

// --- the crash guard ------------------------------------------------------------------------

struct Strike {
  int count = 0;
  std::string fingerprint;  // the plugin file as it was (path, inode, size, mtime)
};

struct Guard {
  int fd = -1;  // state_dir/plugin-guard; -1 outside the daemon
  std::filesystem::path strikes_path;
  std::map<std::string, Strike> strikes;  // by source name
  bool daemon = false;
};

Guard& guard() {
  static Guard g;
  return g;
}

void save_strikes() {
  auto& g = guard();
  if (g.strikes_path.empty()) return;
  const auto tmp = g.strikes_path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    for (const auto& [name, s] : g.strikes)
      if (s.count > 0) out << s.count << '\t' << s.fingerprint << '\t' << name << '\n';
    if (!out) return;
  }
  // No fsync: the strikes must survive the agent's crash, not the machine's (a power loss is
  // not the plugin's fault, and losing a strike then costs one more restart at most).
  std::rename(tmp.c_str(), g.strikes_path.c_str());
}

std::string fingerprint(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return path;
  return path + "|" + std::to_string(st.st_ino) + "|" + std::to_string(st.st_size) + "|" +
         std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec);
}

// Brackets one call into a plugin: the source's name sits in plugin-guard while it runs. A
// plain pwrite/ftruncate (no fsync): the record has to survive the death of this process, which
// the page cache does; two syscalls per call are cheap beside a collection.
class GuardScope {
 public:
  explicit GuardScope(const std::string& name) {
    const int fd = guard().fd;
    if (fd < 0) return;
    armed_ = ::pwrite(fd, name.data(), name.size(), 0) == static_cast<ssize_t>(name.size());
  }
  ~GuardScope() {
    if (armed_) [[maybe_unused]]
      const int r = ::ftruncate(guard().fd, 0);
  }
  GuardScope(const GuardScope&) = delete;
  GuardScope& operator=(const GuardScope&) = delete;

 private:
  bool armed_ = false;
};

// --- trust ----------------------------------------------------------------------------------

std::string check_owner_mode(const std::string& what, const struct stat& st, bool directory) {
  const uid_t me = ::geteuid();
  if (st.st_uid != 0 && st.st_uid != me)
    return what + " is owned by uid " + std::to_string(st.st_uid) + ", not root";
  const bool sticky = directory && (st.st_mode & S_ISVTX);
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !sticky)
    return what + " is writable by " + ((st.st_mode & S_IWOTH) ? "everyone" : "its group") +
           " (mode " + fmt::format("{:04o}", st.st_mode & 07777) + ")";
  return "";
}

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace

std::string PluginSource::untrusted(const std::string& path) {
  char* real = ::realpath(path.c_str(), nullptr);
  if (!real) return "cannot open " + path + ": " + errno_text(errno);
  const std::string resolved = real;
  std::free(real);
  struct stat st {};
  if (::stat(resolved.c_str(), &st) != 0) return "cannot open " + path + ": " + errno_text(errno);
  if (!S_ISREG(st.st_mode)) return path + " is not a regular file";
  if (auto p = check_owner_mode(path, st, false); !p.empty()) return "refused: " + p;
  std::filesystem::path dir = std::filesystem::path(resolved).parent_path();
  for (;;) {
    if (::stat(dir.c_str(), &st) != 0) return "cannot check " + dir.string();
    if (auto p = check_owner_mode("directory " + dir.string(), st, true); !p.empty())
      return "refused " + path + ": " + p;
    if (dir == dir.root_path() || dir.empty()) break;
    dir = dir.parent_path();
  }
  return "";
}

// --- the instance ---------------------------------------------------------------------------

struct PluginSource::Impl {
  PluginSource* self = nullptr;
  std::string what;  // "plugin source 'NAME' (PATH)" for messages
  void* handle = nullptr;
  const tb_source_plugin* table = nullptr;
  std::string plugin_name;  // the table's name, else the file's
  void* instance = nullptr;
  tb_host host{};
  tb_host_api api{};
  sd_event_source* io = nullptr;
  sd_event_source* timer = nullptr;

  // The running collection.
  bool in_collect = false;  // inside the plugin's collect() call
  bool pending = false;     // collect answered PENDING; collect_done not called yet
  bool abandoned = false;   // the pending collection timed out; its collect_done is ignored
  std::optional<telemetry::Record> record;
  std::string garbage;   // why an emit of this collection was refused
  std::string disabled;  // set when the crash guard disabled this source
  int successes = 0;

  ~Impl() { unload(); }

  std::string load();
  void unload();
  void collect();
  void finish(int status, const char* message);
  int emit(std::int64_t ts_ms, const tb_reading* readings, std::size_t count);
  const config::Value* option(const char* key) const;

  std::string name() const { return self->config().name; }
};

namespace {

using Impl = PluginSource::Impl;

Impl* of(tb_host* host) { return host ? host->impl : nullptr; }

// --- host API: C callbacks, nothing may escape ---------------------------------------------

void host_log(tb_host* host, int level, const char* message) noexcept {
  try {
    Impl* impl = of(host);
    if (!impl || !message) return;
    const std::string text = utf8::sanitized(utf8::prefix(message, 1024));
    log::FieldGuard field("TB_SOURCE", impl->name());
    const auto lvl = level <= TB_LOG_ERROR     ? spdlog::level::err
                     : level == TB_LOG_WARNING ? spdlog::level::warn
                     : level <= TB_LOG_INFO    ? spdlog::level::info
                                               : spdlog::level::debug;
    spdlog::log(lvl, "source '{}' ({}): {}", impl->name(), impl->plugin_name, text);
  } catch (...) {
  }
}

int host_emit(tb_host* host, std::int64_t ts_ms, const tb_reading* readings,
              std::size_t count) noexcept {
  try {
    Impl* impl = of(host);
    if (!impl) return -EINVAL;
    return impl->emit(ts_ms, readings, count);
  } catch (...) {
    return -ENOMEM;
  }
}

void host_collect_done(tb_host* host, int status, const char* message) noexcept {
  try {
    // Only for a collection collect answered PENDING; inside collect the answer is its return.
    if (Impl* impl = of(host); impl && impl->pending) impl->finish(status, message);
  } catch (...) {
  }
}

std::int64_t host_now_ms(tb_host*) noexcept { return wall_ms(); }

int host_option_type(tb_host* host, const char* key) noexcept {
  const Impl* impl = of(host);
  const config::Value* v = impl ? impl->option(key) : nullptr;
  if (!v) return TB_OPTION_ABSENT;
  switch (v->data.index()) {
    case 0:
      return TB_OPTION_NULL;
    case 1:
      return TB_OPTION_BOOL;
    case 2:
      return TB_OPTION_INT;
    case 3:
      return TB_OPTION_DOUBLE;
    case 4:
      return TB_OPTION_STRING;
    case 5:
      return TB_OPTION_LIST;
    default:
      return TB_OPTION_MAP;
  }
}

int host_option_bool(tb_host* host, const char* key, int* out) noexcept {
  const Impl* impl = of(host);
  const config::Value* v = impl ? impl->option(key) : nullptr;
  if (!v) return -ENOENT;
  const auto* b = std::get_if<bool>(&v->data);
  if (!b || !out) return -EINVAL;
  *out = *b ? 1 : 0;
  return 0;
}

int host_option_int(tb_host* host, const char* key, std::int64_t* out) noexcept {
  const Impl* impl = of(host);
  const config::Value* v = impl ? impl->option(key) : nullptr;
  if (!v) return -ENOENT;
  const auto* i = std::get_if<std::int64_t>(&v->data);
  if (!i || !out) return -EINVAL;
  *out = *i;
  return 0;
}

int host_option_double(tb_host* host, const char* key, double* out) noexcept {
  const Impl* impl = of(host);
  const config::Value* v = impl ? impl->option(key) : nullptr;
  if (!v) return -ENOENT;
  if (!out) return -EINVAL;
  if (const auto* d = std::get_if<double>(&v->data)) {
    *out = *d;
    return 0;
  }
  if (const auto* i = std::get_if<std::int64_t>(&v->data)) {
    *out = static_cast<double>(*i);
    return 0;
  }
  return -EINVAL;
}

int host_option_string(tb_host* host, const char* key, const char** out) noexcept {
  const Impl* impl = of(host);
  const config::Value* v = impl ? impl->option(key) : nullptr;
  if (!v) return -ENOENT;
  const auto* s = std::get_if<std::string>(&v->data);
  if (!s || !out) return -EINVAL;
  *out = s->c_str();
  return 0;
}

const char* host_option_key(tb_host* host, std::size_t index) noexcept {
  const Impl* impl = of(host);
  if (!impl) return nullptr;
  const auto* map = std::get_if<config::Value::Map>(&impl->self->settings().options.data);
  if (!map || index >= map->size()) return nullptr;
  return (*map)[index].first.c_str();
}

// --- loop callbacks -------------------------------------------------------------------------

int on_io(sd_event_source* s, int fd, std::uint32_t revents, void* userdata) {
  auto* impl = static_cast<Impl*>(userdata);
  try {
    int r = 0;
    {
      GuardScope g(impl->name());
      r = impl->table->on_event(impl->instance, fd, revents);
    }
    if (r < 0) {
      sd_event_source_set_enabled(s, SD_EVENT_OFF);
      log::FieldGuard field("TB_SOURCE", impl->name());
      spdlog::error("{}: on_event failed ({}); its fd is no longer watched", impl->what,
                    errno_text(-r));
    }
  } catch (...) {
  }
  return 0;
}

int on_timeout(sd_event_source*, std::uint64_t, void* userdata) {
  auto* impl = static_cast<Impl*>(userdata);
  try {
    if (impl->pending) {
      impl->abandoned = true;
      impl->record.reset();
      impl->self->fail_collection(impl->what + ": collect did not complete within " +
                                  format_duration(impl->self->settings().timeout));
    }
  } catch (...) {
  }
  return 0;
}

}  // namespace

const config::Value* Impl::option(const char* key) const {
  if (!key) return nullptr;
  const auto* map = std::get_if<config::Value::Map>(&self->settings().options.data);
  if (!map) return nullptr;
  for (const auto& entry : *map)
    if (entry.first == key) return &entry.second;
  return nullptr;
}

std::string Impl::load() {
  const std::string& path = self->settings().path;
  if (auto problem = PluginSource::untrusted(path); !problem.empty()) return problem;
  plugin_name = std::filesystem::path(path).filename().string();

  // Stage 1: dlopen. RTLD_NOW finds a missing symbol now, not in the middle of a collection;
  // RTLD_LOCAL keeps one plugin's symbols from resolving another's.
  dlerror();
  handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* e = dlerror();
    return "cannot load " + path + ": " + (e ? e : "unknown error");
  }
  auto fail = [this](std::string error) {
    ::dlclose(handle);
    handle = nullptr;
    table = nullptr;
    return error;
  };
  // Stage 2: the entry symbol, whose name carries the ABI major version.
  auto entry =
      reinterpret_cast<tb_source_plugin_entry>(::dlsym(handle, TB_SOURCE_PLUGIN_ENTRY_NAME));
  if (!entry) {
    for (int major = 0; major < 10; ++major) {
      if (major == TB_SOURCE_PLUGIN_ABI_MAJOR) continue;
      const std::string other = "tb_source_plugin_v" + std::to_string(major);
      if (::dlsym(handle, other.c_str()))
        return fail(path + " is built for plugin ABI " + std::to_string(major) + " (exports " +
                    other + "); this agent speaks ABI " +
                    std::to_string(TB_SOURCE_PLUGIN_ABI_MAJOR));
    }
    return fail(path + " is not a tb-agent source plugin: no symbol " TB_SOURCE_PLUGIN_ENTRY_NAME);
  }
  // Stage 3: version negotiation.
  static const std::string version = TB_AGENT_VERSION;
  tb_host_info info{sizeof(tb_host_info), TB_SOURCE_PLUGIN_ABI_MAJOR, TB_SOURCE_PLUGIN_ABI_MINOR,
                    version.c_str()};
  {
    GuardScope g(name());
    table = entry(&info);
  }
  if (!table)
    return fail(path + " refused this agent (plugin ABI " +
                std::to_string(TB_SOURCE_PLUGIN_ABI_MAJOR) + "." +
                std::to_string(TB_SOURCE_PLUGIN_ABI_MINOR) + ")");
  if (table->size < offsetof(tb_source_plugin, destroy) + sizeof(table->destroy))
    return fail(path + ": its plugin table is too small (" + std::to_string(table->size) +
                " bytes)");
  if (table->abi_major != TB_SOURCE_PLUGIN_ABI_MAJOR)
    return fail(path + " is built for plugin ABI " + std::to_string(table->abi_major) +
                "; this agent speaks ABI " + std::to_string(TB_SOURCE_PLUGIN_ABI_MAJOR));
  if (!table->create || !table->collect || !table->destroy)
    return fail(path + ": its plugin table lacks create, collect or destroy");
  if (table->name && table->name[0]) plugin_name = utf8::sanitized(utf8::prefix(table->name, 64));
  what = "plugin source '" + name() + "' (" + plugin_name + ")";

  // Stage 4: create.
  host.impl = this;
  api = {};
  api.size = sizeof(api);
  api.log = host_log;
  api.emit = host_emit;
  api.collect_done = host_collect_done;
  api.now_ms = host_now_ms;
  api.option_type = host_option_type;
  api.option_bool = host_option_bool;
  api.option_int = host_option_int;
  api.option_double = host_option_double;
  api.option_string = host_option_string;
  api.option_key = host_option_key;
  char err[512] = {};
  int r = 0;
  {
    GuardScope g(name());
    r = table->create(&api, &host, &instance, err, sizeof err);
  }
  if (r < 0 || !instance) {
    err[sizeof err - 1] = '\0';
    std::string why = utf8::sanitized(utf8::prefix(err, 300));
    if (why.empty()) why = r < 0 ? errno_text(-r) : "no instance";
    instance = nullptr;
    return fail(what + ": create failed: " + why);
  }
  // An optional fd for push sources and asynchronous completion.
  if (table->fd && table->on_event) {
    int fd = -1;
    {
      GuardScope g(name());
      fd = table->fd(instance);
    }
    if (fd >= 0) {
      const int e = sd_event_add_io(self->loop_, &io, fd, EPOLLIN, on_io, this);
      if (e < 0) {
        io = nullptr;
        unload();
        return what + ": cannot watch its fd: " + errno_text(-e);
      }
      sd_event_source_set_priority(io, kCollectionPriority);
    }
  }
  return "";
}

void Impl::unload() {
  io = sd_event_source_disable_unref(io);
  timer = sd_event_source_disable_unref(timer);
  if (instance && table) {
    GuardScope g(name());
    table->destroy(instance);
  }
  instance = nullptr;
  if (handle) ::dlclose(handle);
  handle = nullptr;
  table = nullptr;
  pending = in_collect = abandoned = false;
  record.reset();
}

int Impl::emit(std::int64_t ts_ms, const tb_reading* readings, std::size_t count) {
  auto refuse = [this](int err, std::string why) {
    if (garbage.empty()) garbage = why;
    log::FieldGuard field("TB_SOURCE", name());
    spdlog::warn("{}: emitted garbage: {}", what, why);
    return err;
  };
  if (count == 0) return 0;
  if (!readings) return refuse(-EINVAL, "readings is NULL");
  if (count > TB_MAX_READINGS)
    return refuse(-E2BIG, std::to_string(count) + " readings in one call (at most " +
                              std::to_string(TB_MAX_READINGS) + ")");
  if (ts_ms < 0) return refuse(-EINVAL, "negative timestamp");
  if (ts_ms == 0) ts_ms = wall_ms();
  std::vector<telemetry::Reading> out;
  out.reserve(count);
  // The array's stride is the plugin's sizeof(tb_reading), which a later minor version may have
  // grown: step by readings[0].size and read only the fields this host knows.
  const std::size_t stride = readings[0].size;
  if (stride < offsetof(tb_reading, value) + sizeof(readings[0].value) || stride > 4096)
    return refuse(-EINVAL, "reading 0: size " + std::to_string(stride) + " is not a tb_reading's");
  const auto* base = reinterpret_cast<const unsigned char*>(readings);
  for (std::size_t i = 0; i < count; ++i) {
    tb_reading r{};
    std::memcpy(&r, base + i * stride, sizeof r < stride ? sizeof r : stride);
    const std::string at = "reading " + std::to_string(i);
    if (r.size != stride)
      return refuse(-EINVAL, at + ": size " + std::to_string(r.size) + " differs from reading 0's");
    if (!r.key || !r.key[0]) return refuse(-EINVAL, at + ": empty key");
    const std::size_t key_len = ::strnlen(r.key, TB_MAX_KEY + 1);
    if (key_len > TB_MAX_KEY) return refuse(-EINVAL, at + ": key longer than 256 bytes");
    const std::string_view key(r.key, key_len);
    if (!utf8::valid(key)) return refuse(-EINVAL, at + ": key is not valid UTF-8");
    telemetry::Value value;
    switch (r.type) {
      case TB_VALUE_BOOL:
        if (r.value.b != 0 && r.value.b != 1)
          return refuse(-EINVAL, at + " ('" + printable(key) + "'): a bool must be 0 or 1");
        value = r.value.b == 1;
        break;
      case TB_VALUE_INT:
        value = static_cast<std::int64_t>(r.value.i);
        break;
      case TB_VALUE_DOUBLE:
        if (!std::isfinite(r.value.d))
          return refuse(-EINVAL, at + " ('" + printable(key) + "'): not a finite number");
        value = r.value.d;
        break;
      case TB_VALUE_STRING: {
        if (!r.value.s) return refuse(-EINVAL, at + " ('" + printable(key) + "'): NULL string");
        const std::size_t len = ::strnlen(r.value.s, TB_MAX_STRING_VALUE + 1);
        if (len > TB_MAX_STRING_VALUE)
          return refuse(-EINVAL, at + " ('" + printable(key) + "'): string longer than 4096 bytes");
        const std::string_view s(r.value.s, len);
        if (!utf8::valid(s))
          return refuse(-EINVAL, at + " ('" + printable(key) + "'): string is not valid UTF-8");
        value = std::string(s);
        break;
      }
      default:
        return refuse(-EINVAL, at + " ('" + printable(key) + "'): unknown value type " +
                                   std::to_string(r.type));
    }
    out.push_back({std::string(key), std::move(value)});
  }
  const bool collecting = (in_collect || pending) && !abandoned;
  if (collecting) {
    if (!record) {
      record.emplace();
      record->ts_ms = ts_ms;
      record->source = name();
    }
    if (record->ts_ms == ts_ms) {
      if (record->readings.size() + out.size() > TB_MAX_READINGS)
        return refuse(
            -E2BIG, "more than " + std::to_string(TB_MAX_READINGS) + " readings in one collection");
      for (auto& r : out) record->readings.push_back(std::move(r));
      return 0;
    }
  }
  // Outside a collection (push) or at another instant: a record of its own.
  telemetry::Record rec;
  rec.ts_ms = ts_ms;
  rec.source = name();
  rec.readings = std::move(out);
  self->push_record(std::move(rec));
  return 0;
}

void Impl::collect() {
  record.reset();
  garbage.clear();
  int r = 0;
  in_collect = true;
  {
    GuardScope g(name());
    r = table->collect(instance);
  }
  if (r == TB_COLLECT_PENDING) {
    in_collect = false;
    pending = true;
    abandoned = false;
    const std::uint64_t usec = static_cast<std::uint64_t>(self->settings().timeout.count()) * 1000;
    if (!timer) {
      if (sd_event_add_time_relative(self->loop_, &timer, CLOCK_BOOTTIME, usec, 0, on_timeout,
                                     this) < 0) {
        timer = nullptr;
      } else {
        sd_event_source_set_priority(timer, kCollectionPriority);
      }
    } else {
      sd_event_source_set_time_relative(timer, usec);
      sd_event_source_set_enabled(timer, SD_EVENT_ONESHOT);
    }
    return;
  }
  finish(r, nullptr);
}

void Impl::finish(int status, const char* message) {
  if (!in_collect && !pending) return;  // no collection to finish (a stray collect_done)
  if (pending) {
    pending = false;
    if (timer) sd_event_source_set_enabled(timer, SD_EVENT_OFF);
    if (abandoned) {  // already reported as timed out
      abandoned = false;
      record.reset();
      return;
    }
  }
  in_collect = false;
  std::optional<telemetry::Record> rec = std::move(record);
  record.reset();
  if (!garbage.empty() || status < 0) successes = 0;  // strikes are forgiven only "in a row"
  if (!garbage.empty()) {
    self->fail_collection(what + " emitted garbage: " + garbage);
    return;
  }
  if (status < 0 || (status != TB_COLLECT_DONE && status != TB_COLLECT_PENDING)) {
    std::string why = message ? utf8::sanitized(utf8::prefix(message, 300)) : std::string();
    if (why.empty())
      why = status < 0 ? errno_text(-status) : "unknown answer " + std::to_string(status);
    self->fail_collection(what + ": collect failed: " + why);
    return;
  }
  if (!rec) {
    rec.emplace();
    rec->ts_ms = wall_ms();
    rec->source = name();
  }
  if (++successes == PluginSource::kForgiveAfter) {
    auto& g = guard();
    if (auto it = g.strikes.find(name()); it != g.strikes.end() && it->second.count > 0) {
      g.strikes.erase(it);
      save_strikes();
    }
  }
  self->complete_collection(std::move(*rec));
}

// --- PluginSource ---------------------------------------------------------------------------

PluginSource::PluginSource(sd_event* loop, config::SourceConfig config)
    : Source(loop, std::move(config), "plugin"),
      settings_(static_cast<const PluginSettings&>(*config_.settings)),
      impl_(std::make_unique<Impl>()) {
  impl_->self = this;
  impl_->what = "plugin source '" + config_.name + "'";
  impl_->plugin_name = std::filesystem::path(settings_.path).filename().string();
}

PluginSource::~PluginSource() {
  try {
    impl_.reset();
  } catch (...) {
  }
}

namespace {
std::string disabled_reason(const config::SourceConfig& config) {
  const std::string& path = config::settings_of<PluginSettings>(config)->path;
  auto& g = guard();
  auto it = g.strikes.find(config.name);
  if (it == g.strikes.end()) return "";
  if (it->second.fingerprint.empty()) {  // a strike counted at start, before the config was read
    it->second.fingerprint = fingerprint(path);
    save_strikes();
  } else if (it->second.fingerprint != fingerprint(path)) {
    // The plugin file changed (or moved): a new plugin gets a clean slate.
    g.strikes.erase(it);
    save_strikes();
    return "";
  }
  if (it->second.count < PluginSource::kMaxStrikes) return "";
  return "disabled: the agent died inside this plugin " + std::to_string(it->second.count) +
         " times (a crash, or a hang the watchdog ended); replace the plugin file or reload to "
         "try it again";
}
}  // namespace

namespace {

using config::Need;
using S = PluginSettings;

// path: absolute, or a plugin's name looked up in plugin_dir ("hwmon" → plugin_dir/hwmon.so).
std::optional<std::string> read_path(const config::Field& f) {
  auto v = config::text()(f);
  if (!v) return std::nullopt;
  std::string problem;
  if (v->front() == '/') {
    problem = config::check_absolute(*v);
  } else if (!config::looks_like_key(*v) || *v == "." || *v == "..") {
    problem = "must be an absolute path or a plugin name (letters, digits, _ - .), not " +
              config::shown(*v);
  }
  if (!problem.empty()) {
    f.error(problem);
    return std::nullopt;
  }
  return v;
}

// The bounds of `options:` (kMaxOption*): false after reporting the first excess.
bool bounded(const config::Value& v, const std::string& path, int depth, std::size_t& nodes,
             config::Report& report) {
  if (++nodes > config::kMaxOptionNodes) {
    report.error(v.position, path + ": too many options (at most " +
                                 std::to_string(config::kMaxOptionNodes) + " values)");
    return false;
  }
  if (depth > config::kMaxOptionDepth) {
    report.error(v.position, path + ": nested too deeply (at most " +
                                 std::to_string(config::kMaxOptionDepth) + " levels)");
    return false;
  }
  if (v.is_scalar() && v.text.size() > config::kMaxOptionString) {
    report.error(v.position,
                 path + ": longer than " + std::to_string(config::kMaxOptionString) + " bytes");
    return false;
  }
  if (const auto* list = v.list()) {
    for (std::size_t i = 0; i < list->size(); ++i)
      if (!bounded((*list)[i], path + "[" + std::to_string(i) + "]", depth + 1, nodes, report))
        return false;
  }
  if (const auto* map = v.map()) {
    for (std::size_t i = 0; i < map->size(); ++i) {
      const std::string& name = (*map)[i].first;
      const config::Value& value = (*map)[i].second;
      if (name.empty() || !utf8::valid(name) || name.size() > 256) {
        report.error((*map)[i].key_position,
                     path + ": an option's name must be a non-empty string");
        return false;
      }
      for (std::size_t j = 0; j < i; ++j) {
        if ((*map)[j].first == name) {
          report.error((*map)[i].key_position, path + "." + name + ": duplicate key");
          return false;
        }
      }
      if (!bounded(value, path + "." + name, depth + 1, nodes, report)) return false;
    }
  }
  return true;
}

// options: any map, handed to the plugin as typed values.
std::optional<config::Value> read_options(const config::Field& f) {
  if (!f.value.map() && !f.value.is_null()) {
    f.error("expected a map of option names to values, not " + std::string(config::kind(f.value)));
    return std::nullopt;
  }
  std::size_t nodes = 0;
  if (!bounded(f.value, f.path, 0, nodes, f.report)) return std::nullopt;
  return f.value;
}

const config::Keys<S> kPluginKeys = {
    {"path", Need::Required, "absolute path, or a name", "", config::into(&S::path, read_path),
     "The plugin: an absolute path, or a name looked up in plugin_dir."},
    {"timeout", Need::Optional, "duration, at least 100ms", "5s",
     config::into(&S::timeout, config::duration(Millis(100), Millis::max())),
     "How long an asynchronous collection may take."},
    {"options", Need::Optional, "map", "", config::into(&S::options, read_options),
     "Handed to the plugin as typed values."},
};

void check_plugin(const CheckContext& c, S& s) {
  fit_timeout(c, s.timeout);
  // A name is a file in plugin_dir (which may be set after the sources).
  if (s.path.empty() || s.path.front() == '/') return;
  const bool has_suffix = s.path.size() > 3 && s.path.compare(s.path.size() - 3, 3, ".so") == 0;
  s.path = (c.context.plugin_dir / (has_suffix ? s.path : s.path + ".so")).string();
}

}  // namespace

const SourceType& PluginSource::declaration() {
  static const SourceType type = declare<PluginSettings>(
      "plugin", Collection::Periodic, kPluginKeys, &PluginSource::create, check_plugin);
  return type;
}

SourcePtr PluginSource::create(sd_event* loop, const config::SourceConfig& config,
                               std::string* error) {
  const std::string& path = config::settings_of<PluginSettings>(config)->path;
  if (path.empty()) {
    *error = "path is empty";
    return nullptr;
  }
  std::unique_ptr<PluginSource> s(new PluginSource(loop, config));
  if (guard().daemon) {
    s->impl_->disabled = disabled_reason(config);
    if (!s->impl_->disabled.empty()) {
      log::FieldGuard field("TB_SOURCE", config.name);
      spdlog::error("{} ({}) {}", s->impl_->what, path, s->impl_->disabled);
      return s;
    }
  }
  std::string err = s->impl_->load();
  if (!err.empty()) {
    if (!guard().daemon) {
      *error = err;
      return nullptr;
    }
    // In the daemon: this source's error, retried at its next collection.
    log::FieldGuard field("TB_SOURCE", config.name);
    spdlog::error("source '{}': {}", config.name, err);
  }
  return s;
}

void PluginSource::begin() {
  Impl& impl = *impl_;
  if (guard().daemon && !impl.disabled.empty()) {
    impl.disabled = disabled_reason(config_);
    if (!impl.disabled.empty()) {
      complete({std::nullopt, impl.disabled});
      return;
    }
  }
  if (!impl.instance) {
    if (std::string err = impl.load(); !err.empty()) {
      complete({std::nullopt, err});
      return;
    }
  }
  if (impl.pending) {
    complete({std::nullopt, impl.what + ": its previous collection never completed (timed out)"});
    return;
  }
  impl.collect();
}

void PluginSource::cancel() {
  // The plugin's pending collection stays its own business: its collect_done is ignored.
  if (impl_->pending) {
    impl_->abandoned = true;
    if (impl_->timer) sd_event_source_set_enabled(impl_->timer, SD_EVENT_OFF);
  }
}

void PluginSource::fail_collection(std::string error) {
  complete({std::nullopt, std::move(error)});
}

void PluginSource::complete_collection(telemetry::Record record) {
  complete({std::move(record), {}});
}

void PluginSource::push_record(telemetry::Record record) { push(std::move(record)); }

bool PluginSource::guard_open(const std::filesystem::path& state_dir, std::string* error) {
  auto& g = guard();
  guard_close();
  const auto guard_path = state_dir / "plugin-guard";
  g.strikes_path = state_dir / "plugin-strikes";
  g.strikes.clear();
  std::ifstream in(g.strikes_path);
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    Strike s;
    std::string name;
    if (fields >> s.count && fields.get() == '\t' && std::getline(fields, s.fingerprint, '\t') &&
        std::getline(fields, name) && !name.empty())
      g.strikes[name] = s;
  }
  g.fd = ::open(guard_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (g.fd < 0) {
    *error = "cannot open " + guard_path.string() + ": " + errno_text(errno);
    return false;
  }
  g.daemon = true;
  char buf[256];
  const ssize_t n = ::pread(g.fd, buf, sizeof buf, 0);
  if (n > 0) {
    // The previous run died inside this source's plugin.
    const std::string name(buf, static_cast<std::size_t>(n));
    Strike& s = g.strikes[name];
    ++s.count;
    log::FieldGuard field("TB_SOURCE", name);
    spdlog::error(
        "the agent stopped while inside plugin source '{}' (a crash, or a hang the watchdog "
        "ended); strike {} of {}",
        printable(name, 64), s.count, kMaxStrikes);
    [[maybe_unused]] const int r = ::ftruncate(g.fd, 0);
    // A first strike's fingerprint is filled in when the source is built (the path is in the
    // config, not read yet).
    save_strikes();
  }
  return true;
}

void PluginSource::guard_close() {
  auto& g = guard();
  if (g.fd >= 0) ::close(g.fd);
  g.fd = -1;
  g.daemon = false;
}

void PluginSource::guard_forgive() {
  auto& g = guard();
  if (g.strikes.empty()) return;
  g.strikes.clear();
  save_strikes();
}

}  // namespace tb::sources
