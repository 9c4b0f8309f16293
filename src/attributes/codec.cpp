#include "attributes/codec.hpp"

#include "sources/exec_source.hpp"
#include "sources/plugin_source.hpp"
#include "util/units.hpp"

namespace tb::attributes {

using nlohmann::json;

namespace {

json to_json(const config::Value& v) {
  struct Visit {
    json operator()(std::monostate) const { return nullptr; }
    json operator()(bool b) const { return b; }
    json operator()(std::int64_t i) const { return i; }
    json operator()(double d) const { return d; }
    json operator()(const std::string& s) const { return s; }
    json operator()(const config::Value::List& l) const {
      json out = json::array();
      for (const auto& e : l) out.push_back(to_json(e));
      return out;
    }
    json operator()(const config::Value::Map& m) const {
      json out = json::object();
      for (const auto& e : m) out[e.first] = to_json(e.second);
      return out;
    }
  };
  return std::visit(Visit{}, v.data);
}

std::optional<json> parse_bounded(std::string_view payload, std::string* error) {
  if (payload.size() > kMaxPayload) {
    *error =
        std::to_string(payload.size()) + " bytes, over the " + format_size(kMaxPayload) + " limit";
    return std::nullopt;
  }
  if (nesting_depth(payload) > kMaxDepth) {
    *error = "nested deeper than " + std::to_string(kMaxDepth) + " levels";
    return std::nullopt;
  }
  json j = json::parse(payload, nullptr, false);
  if (j.is_discarded()) {
    *error = "not JSON";
    return std::nullopt;
  }
  if (!j.is_object()) {
    *error = "not a JSON object";
    return std::nullopt;
  }
  if (j.size() > kMaxKeys) {
    *error = "more than " + std::to_string(kMaxKeys) + " keys";
    return std::nullopt;
  }
  return j;
}

}  // namespace

int nesting_depth(std::string_view text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      deepest = std::max(deepest, ++depth);
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return deepest;
}

json client_attributes(const Facts& f, const config::Value& statics) {
  json out = json::object();
  out["agent_version"] = f.agent_version;
  out["hostname"] = f.hostname;
  out["os"] = f.os;
  out["kernel"] = f.kernel;
  out["ip_addresses"] = f.ip_addresses;
  json sources = json::object();
  for (const auto& [name, interval] : f.sources)
    sources[name] = interval.count() > 0 ? json(format_duration(interval)) : json(nullptr);
  out["sources"] = sources;
  if (const auto* m = std::get_if<config::Value::Map>(&statics.data)) {
    for (const auto& e : *m) out[e.first] = to_json(e.second);
  }
  return out;
}

json changed_attributes(const json& sent, const json& now) {
  json out = json::object();
  for (auto it = now.begin(); it != now.end(); ++it) {
    if (!sent.is_object() || !sent.contains(it.key()) || sent[it.key()] != it.value())
      out[it.key()] = it.value();
  }
  return out;
}

std::optional<SharedUpdate> parse_notification(std::string_view payload, std::string* error) {
  auto j = parse_bounded(payload, error);
  if (!j) return std::nullopt;
  SharedUpdate u;
  for (auto it = j->begin(); it != j->end(); ++it) {
    if (it.key() == "deleted") {
      // §2.3: {"deleted":[…]}; a shared attribute literally named "deleted" is ambiguous, and a
      // "deleted" that is not a list of strings is refused.
      if (!it.value().is_array()) {
        *error = "\"deleted\" is not a list";
        return std::nullopt;
      }
      for (const auto& k : it.value()) {
        if (!k.is_string()) {
          *error = "\"deleted\" holds something other than names";
          return std::nullopt;
        }
        u.deleted.push_back(k.get<std::string>());
      }
      continue;
    }
    u.values[it.key()] = it.value();
  }
  return u;
}

std::optional<SharedUpdate> parse_get_answer(std::string_view payload, std::string* error) {
  auto j = parse_bounded(payload, error);
  if (!j) return std::nullopt;
  SharedUpdate u;
  if (!j->contains("shared")) return u;  // §2.2: a section is present only when not empty
  const json& shared = (*j)["shared"];
  if (!shared.is_object()) {
    *error = "\"shared\" is not an object";
    return std::nullopt;
  }
  for (auto it = shared.begin(); it != shared.end(); ++it) u.values[it.key()] = it.value();
  return u;
}

std::string apply_setting(config::Config& cfg, const std::string& setting, const json& value) {
  if (setting == "log_level" || setting == "logging.level") {
    static const char* kLevels[] = {"trace", "debug", "info", "warning", "error"};
    if (value.is_string()) {
      for (const char* l : kLevels) {
        if (value.get<std::string>() == l) {
          cfg.logging.level = l;
          return "";
        }
      }
    }
    return "must be one of trace, debug, info, warning, error";
  }
  constexpr std::string_view prefix = "sources.", suffix = ".interval";
  if (setting.rfind(prefix, 0) == 0 && setting.size() > prefix.size() + suffix.size()) {
    const std::string name =
        setting.substr(prefix.size(), setting.size() - prefix.size() - suffix.size());
    config::SourceConfig* source = nullptr;
    for (auto& s : cfg.sources)
      if (s.name == name) source = &s;
    if (!source) return "no source named '" + name + "'";
    // A type without an interval (execd reports whenever it has readings) loads with 0.
    if (source->interval == Millis(0)) return "a " + source->type + " source has no interval";
    std::optional<Millis> d;
    std::string why;
    if (value.is_string()) {
      d = parse_duration(value.get<std::string>(), &why);
    } else if (value.is_number() && value.get<double>() >= 0 && value.get<double>() < 1e9) {
      d = Millis(static_cast<Millis::rep>(value.get<double>() * 1000));
    } else {
      why = "must be a duration (\"30s\") or a number of seconds";
    }
    if (!d) return why;
    if (*d < Millis(100) || *d > Millis(7LL * 24 * 3600 * 1000))
      return "must be from 100ms to 7d, not " + format_duration(*d);
    // A run must fit in its interval (as the loader checks for the file's own interval).
    std::optional<Millis> timeout;
    if (const auto* p = config::settings_of<sources::ProgramSettings>(*source))
      timeout = p->timeout;
    if (const auto* p = config::settings_of<sources::PluginSettings>(*source)) timeout = p->timeout;
    if (timeout && *timeout > *d)
      return "must not be shorter than the source's timeout (" + format_duration(*timeout) + ")";
    source->interval = *d;
    return "";
  }
  return "not a setting a shared attribute may change";
}

}  // namespace tb::attributes
