// The registry of source types: one row per type.
#include <array>

#include "sources/exec_source.hpp"
#include "sources/execd_source.hpp"
#include "sources/file_source.hpp"
#include "sources/plugin_source.hpp"
#include "sources/source.hpp"
#include "sources/system_source.hpp"

namespace tb::sources {

namespace {

using Factory = SourcePtr (*)(sd_event* loop, const config::SourceConfig& config,
                              std::string* error);

struct TypeEntry {
  config::SourceType type;
  std::string_view name;  // as written in the config's `type:`
  Factory make;
};

constexpr std::array kTypes{
    TypeEntry{config::SourceType::File, "file", &FileSource::create},
    TypeEntry{config::SourceType::Exec, "exec", &ExecSource::create},
    TypeEntry{config::SourceType::System, "system", &SystemSource::create},
    TypeEntry{config::SourceType::Plugin, "plugin", &PluginSource::create},
    TypeEntry{config::SourceType::Execd, "execd", &ExecdSource::create},
};

const TypeEntry* find(config::SourceType type) {
  for (const auto& t : kTypes)
    if (t.type == type) return &t;
  return nullptr;
}

}  // namespace

std::string_view type_name(config::SourceType type) {
  const auto* t = find(type);
  return t ? t->name : "unknown";
}

SourcePtr make_source(sd_event* loop, const config::SourceConfig& config, std::string* error) {
  const auto* t = find(config.type);
  if (!t) {
    if (error) *error = "source type has no implementation";
    return nullptr;
  }
  if (config.interval.count() <= 0) {
    if (error) *error = "interval must be positive";
    return nullptr;
  }
  std::string err;
  auto s = t->make(loop, config, &err);
  if (!s && error) *error = err;
  return s;
}

}  // namespace tb::sources
