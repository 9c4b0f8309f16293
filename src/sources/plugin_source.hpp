// type: plugin — a shared object speaking the C ABI of include/tb-agent/source_plugin.h
// (docs/plugins.md). The only place that dlopens.
//
// Loading goes in stages, each undone when a later one fails: trust checks on the file and every
// directory above it (owned by root or by the agent's own user, not group/world-writable unless
// sticky) → dlopen(RTLD_NOW|RTLD_LOCAL) of the checked, open file → the entry symbol
// tb_source_plugin_v1 → its table (ABI major, size, required entry points) → create.
//
// Crashes and hangs: plugins run in-process (docs/plugins.md, "When a plugin crashes or hangs").
// Every call into a plugin is bracketed by a record in state_dir/plugin-guard; a record left over
// at start means the previous run died inside that plugin (a crash, or a hang the systemd
// watchdog killed) and counts a strike; after kMaxStrikes the source stays disabled with a clear
// error instead of crashing the agent in a loop. The queue is durable, so nothing is lost.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "sources/source.hpp"

namespace tb::sources {

struct SourceType;

// Its keys: the table in plugin_source.cpp.
struct PluginSettings : config::SettingsOf<PluginSettings> {
  std::string path;       // absolute; a name in the file was resolved against plugin_dir
  Millis timeout{5000};   // an asynchronous collection must complete within it
  config::Value options;  // the `options:` map (a Value::Map), or null
  bool operator==(const PluginSettings&) const = default;
};

class PluginSource final : public Source {
 public:
  static constexpr int kMaxStrikes = 3;
  // Successful collections after which a plugin's strikes are forgiven ("in a row").
  static constexpr int kForgiveAfter = 10;

  // Outside the daemon (--check-config, --test, tests) a plugin that cannot be loaded fails
  // create(). In the daemon (after guard_open) it is a runtime error of that source only, shown
  // in its status and retried each interval: one broken plugin never stops the other sources.
  static const SourceType& declaration();
  static SourcePtr create(sd_event* loop, const config::SourceConfig& config, std::string* error);
  ~PluginSource() override;

  const PluginSettings& settings() const { return settings_; }

  // The daemon's crash guard (one per process): opens state_dir/plugin-guard, counts a strike for
  // a record left by the previous run (logged), and loads the strikes (state_dir/plugin-strikes).
  static bool guard_open(const std::filesystem::path& state_dir, std::string* error);
  static void guard_close();
  // An operator's reload forgives every strike (a disabled plugin is tried again).
  static void guard_forgive();

  // Why `path` may not be loaded ("" = fine): the file and each directory above it must be owned
  // by root or this process's user and not writable by group or others (sticky directories
  // excepted); the file must be a regular file.
  static std::string untrusted(const std::string& path);

 protected:
  void begin() override;
  void cancel() override;

 public:  // for the C callbacks in plugin_source.cpp
  struct Impl;
  void fail_collection(std::string error);
  void complete_collection(telemetry::Record record);
  void push_record(telemetry::Record record);

 private:
  PluginSource(sd_event* loop, config::SourceConfig config);
  const PluginSettings& settings_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tb::sources
