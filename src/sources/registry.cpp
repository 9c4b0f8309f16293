// The registry of source types (a factory map, Waybar style): one line per type. A type brings
// its own files — its class, its settings struct and its one table of keys — and its line here.
#include <algorithm>

#include "sources/exec_source.hpp"
#include "sources/execd_source.hpp"
#include "sources/file_source.hpp"
#include "sources/plugin_source.hpp"
#include "sources/source.hpp"
#include "sources/source_type.hpp"
#include "sources/system_source.hpp"
#include "util/units.hpp"

namespace tb::sources {

namespace {

using namespace std::chrono_literals;
using config::Need;
using Common = config::SourceCommon;

// In the order messages list them.
const std::vector<const SourceType*>& types() {
  static const std::vector<const SourceType*> list = {
      &FileSource::declaration(),  &ExecSource::declaration(),   &SystemSource::declaration(),
      &ExecdSource::declaration(), &PluginSource::declaration(),
  };
  return list;
}

const config::Keys<Common> kCommonKeys = {
    {"name", Need::Required, "string", "",
     config::into(&Common::name, config::text(config::check_printable)),
     "Unique among the sources; shown in logs and on D-Bus."},
    // Read before the other keys: it decides which keys the item may have.
    {"type", Need::Required, "a type's name", "",
     [](const config::Field&, Common&) { return true; }, "What kind of source."},
    // Periodic types only (an execd program reports whenever it has readings).
    {"interval", Need::Optional, "duration, at least 100ms", "30s",
     config::into(&Common::interval, config::duration(100ms, Millis::max())), "How often to read."},
};

bool applies(const config::Key<Common>& key, const SourceType* type) {
  return key.name != "interval" || type == nullptr || type->periodic;
}

std::string type_list(std::string_view separator, std::string_view last) {
  std::string out;
  const auto& all = types();
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (i > 0) out += i + 1 == all.size() ? last : separator;
    out += all[i]->name;
  }
  return out;
}

const AnyKey* find_key(const SourceType& type, std::string_view name) {
  const auto it = std::find_if(type.keys.begin(), type.keys.end(),
                               [&](const AnyKey& k) { return k.name == name; });
  return it == type.keys.end() ? nullptr : &*it;
}

// The types that have key `name`, for "only file and plugin sources have this key".
std::string owners(std::string_view name) {
  std::string out;
  for (const auto* t : types()) {
    const bool has = name == "interval" ? t->periodic : find_key(*t, name) != nullptr;
    if (has) out += (out.empty() ? "" : " and ") + std::string(t->name);
  }
  return out;
}

class Registry final : public config::SourceTypes {
 public:
  std::optional<config::SourceConfig> parse(const config::Value& item, const std::string& path,
                                            const config::SourceContext& context,
                                            config::Report& report) const override {
    const config::Value::Map* map = item.map();
    if (!map) return std::nullopt;  // config/ reports items that are not maps
    config::SourceConfig out;
    out.position = item.position;
    const SourceType* type = read_type(*map, item, path, report);
    std::unique_ptr<config::SourceSettings> settings;
    if (type) {
      out.type = std::string(type->name);
      settings = type->make();
    }
    // Defaults are declared as the text a user would write, and read like it.
    for (const auto& k : kCommonKeys) {
      if (k.default_text.empty() || !applies(k, type)) continue;
      const config::Value v = config::scalar_value(k.default_text);
      k.read({v, {}, path + "." + std::string(k.name), report}, out);
    }
    if (type && !type->periodic) out.interval = Millis(0);
    if (type) {
      for (const auto& k : type->keys) {
        if (k.default_text.empty()) continue;
        const config::Value v = config::scalar_value(k.default_text);
        k.read({v, {}, path + "." + std::string(k.name), report}, *settings);
      }
    }

    Seen seen;
    for (const auto& entry : *map) {
      const std::string& name = entry.first;
      const config::Field field{entry.second, entry.key_position, path + "." + name, report};
      if (auto prev = seen.find(name); prev != seen.end()) {
        report.error(entry.key_position, field.path + ": duplicate key (first given at line " +
                                             std::to_string(prev->second.entry->key_position.line) +
                                             ")");
        continue;
      }
      Given& given = seen[name];
      given.entry = &entry;
      const auto common =
          std::find_if(kCommonKeys.begin(), kCommonKeys.end(),
                       [&](const config::Key<Common>& k) { return k.name == name; });
      if (common != kCommonKeys.end() && applies(*common, type)) {
        given.valid = common->read(field, out);
        continue;
      }
      if (type) {
        if (const AnyKey* k = find_key(*type, name)) {
          given.valid = k->read(field, *settings);
          continue;
        }
      } else if (read_with_any_type(name, field)) {
        continue;  // a type is missing or unknown: each key's own problems are still reported
      }
      const std::string others = owners(name);
      if (type && !others.empty()) {
        report.error(entry.key_position, field.path + ": only " + others +
                                             " sources have this key, not " +
                                             std::string(type->name) + " sources");
      } else {
        report.error(entry.key_position,
                     path + ": " +
                         (config::looks_like_key(name) ? "unknown key " + config::shown(name)
                                                       : std::string("unknown key")) +
                         " (known keys: " + known_keys(type) + ")");
      }
    }

    for (const auto& k : kCommonKeys)
      if (k.need == Need::Required && !seen.count(k.name))
        report.error(item.position, path + ": missing required key '" + std::string(k.name) + "'");
    if (!type) return std::nullopt;
    for (const auto& k : type->keys)
      if (k.need == Need::Required && !seen.count(k.name))
        report.error(item.position, path + ": missing required key '" + std::string(k.name) + "'");
    if (type->check) type->check({out, seen, context, path, report}, *settings);
    out.settings = std::move(settings);
    return out;
  }

 private:
  // The type decides which keys the item may have, so it is read first.
  static const SourceType* read_type(const config::Value::Map& map, const config::Value& item,
                                     const std::string& path, config::Report& report) {
    const auto it = std::find_if(map.begin(), map.end(),
                                 [](const config::Value::Entry& e) { return e.first == "type"; });
    if (it == map.end()) return nullptr;  // reported as a missing required key
    const config::Value& v = it->second;
    if (!v.is_scalar()) {
      report.error(
          v.is_null() ? item.position : v.position,
          path + ".type: expected " + type_list(", ", " or ") + ", not " + config::kind(v));
      return nullptr;
    }
    if (const SourceType* t = find_type(v.text)) return t;
    report.error(v.position, path + ".type: unknown source type " + config::shown(v.text) +
                                 " (use " + type_list(", ", " or ") + ")");
    return nullptr;
  }

  // Without a usable type, a key any type declares is read as that type reads it.
  static bool read_with_any_type(const std::string& name, const config::Field& field) {
    for (const auto* t : types()) {
      if (const AnyKey* k = find_key(*t, name)) {
        auto scratch = t->make();
        k->read(field, *scratch);
        return true;
      }
    }
    return false;
  }

  static std::string known_keys(const SourceType* type) {
    std::vector<std::string_view> names;
    for (const auto& k : kCommonKeys)
      if (applies(k, type)) names.push_back(k.name);
    for (const auto* t : types()) {
      if (type && t != type) continue;
      for (const auto& k : t->keys)
        if (std::find(names.begin(), names.end(), k.name) == names.end()) names.push_back(k.name);
    }
    std::string out;
    for (auto n : names) out += (out.empty() ? "" : ", ") + std::string(n);
    return out;
  }
};

}  // namespace

const config::Keys<config::SourceCommon>& common_keys() { return kCommonKeys; }

const std::vector<const SourceType*>& all_types() { return types(); }

const SourceType* find_type(std::string_view name) {
  for (const auto* t : types())
    if (t->name == name) return t;
  return nullptr;
}

const config::SourceTypes& source_types() {
  static const Registry registry;
  return registry;
}

void fit_timeout(const CheckContext& c, Millis& timeout) {
  const auto given = c.seen.find("timeout");
  if (given == c.seen.end()) {
    // The default (5s) would otherwise make every short interval an error.
    timeout = std::min(timeout, c.common.interval);
    return;
  }
  if (!given->second.valid || timeout <= c.common.interval) return;
  const auto interval = c.seen.find("interval");
  if (interval != c.seen.end() && !interval->second.valid) return;  // reported already
  // A run that may outlast the interval would overlap the next one.
  c.report.error(given->second.entry->second.position,
                 c.path + ".timeout (" + format_duration(timeout) +
                     ") must not be longer than interval (" + format_duration(c.common.interval) +
                     ")");
}

SourcePtr make_source(sd_event* loop, const config::SourceConfig& config, std::string* error) {
  const SourceType* t = find_type(config.type);
  if (!t) {
    if (error) *error = "source type '" + config.type + "' has no implementation";
    return nullptr;
  }
  if (!config.settings || !t->owns(*config.settings)) {
    if (error) *error = "the settings are not those of a " + config.type + " source";
    return nullptr;
  }
  if (t->periodic && config.interval.count() <= 0) {
    if (error) *error = "interval must be positive";
    return nullptr;
  }
  std::string err;
  auto s = t->create(loop, config, &err);
  if (!s && error) *error = err;
  return s;
}

}  // namespace tb::sources
