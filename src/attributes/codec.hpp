// ThingsBoard attributes as JSON (docs/thingsboard-coap.md §2; docs/attributes.md): the client
// attributes the agent publishes, the shared-attribute notifications and GET answers it reads,
// and what a shared attribute may change (`remote:`). Pure functions; no I/O.
#pragma once

#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.hpp"

namespace tb::attributes {

// Bounds of what the server may send us (a hostile or broken server must not make the agent
// hold or walk more): the body size, and the nesting depth of any value.
inline constexpr std::size_t kMaxPayload = 16 * 1024;
inline constexpr int kMaxDepth = 8;
inline constexpr std::size_t kMaxKeys = 256;

// The agent's own facts (docs/attributes.md lists the attribute names).
struct Facts {
  std::string agent_version;
  std::string hostname;
  std::string os;      // PRETTY_NAME of os-release
  std::string kernel;  // uname -r
  std::vector<std::string> ip_addresses;
  std::vector<std::pair<std::string, Millis>> sources;  // name, interval (0 = event-driven)
};

// The client attributes: the facts plus the config's static `attributes:` (which win on a name
// clash: the operator said so).
nlohmann::json client_attributes(const Facts& facts, const config::Value& statics);

// The keys of `now` whose value differs from `sent` (or that `sent` lacks): what to publish.
nlohmann::json changed_attributes(const nlohmann::json& sent, const nlohmann::json& now);

struct SharedUpdate {
  std::map<std::string, nlohmann::json> values;  // changed (or, for a full state, all) keys
  std::vector<std::string> deleted;
};

// A notification: a flat object of the changed keys, and/or {"deleted":[...]} (§2.3). nullopt
// and *error for anything else (not JSON, not an object, too big, too deep, "deleted" not a
// list of strings).
std::optional<SharedUpdate> parse_notification(std::string_view payload, std::string* error);
// The answer to GET attributes: {"client":{…},"shared":{…}} (§2.2); its shared part.
std::optional<SharedUpdate> parse_get_answer(std::string_view payload, std::string* error);

// Sets `setting` (a `remote:` target: log_level, logging.level, sources.NAME.interval) in
// `cfg` to `value`. Returns "" or why the value is refused (wrong type, out of range, unknown
// source); `cfg` is unchanged then.
std::string apply_setting(config::Config& cfg, const std::string& setting,
                          const nlohmann::json& value);

// The deepest nesting of arrays and objects in a JSON text (strings skipped), to refuse deep
// input before parsing it.
int nesting_depth(std::string_view text);

}  // namespace tb::attributes
