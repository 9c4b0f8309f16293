// A source type as the registry knows it: its name, its one declaration table of keys (name,
// type, default, check, description; config/schema.hpp), a check across its keys, and its
// factory. Each type declares itself beside its code (FileSource::declaration() in
// file_source.cpp, …); registry.cpp lists them, one line each. The registry reads every item of
// `sources:` with its type's table, so unknown keys, wrong types and out-of-range values are
// reported with their position by --check-config like every other problem of the file.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "config/schema.hpp"
#include "sources/source.hpp"

namespace tb::sources {

using Factory = SourcePtr (*)(sd_event* loop, const config::SourceConfig& config,
                              std::string* error);

// A key as written in an item, and whether its value was read without a problem.
struct Given {
  const config::Value::Entry* entry = nullptr;
  bool valid = false;
};
using Seen = std::map<std::string, Given, std::less<>>;

// What a type's check across keys sees, after every key was read.
struct CheckContext {
  const config::SourceCommon& common;  // name, type, interval
  const Seen& seen;                    // the keys given
  const config::SourceContext& context;
  const std::string& path;  // "sources[2]"
  config::Report& report;
};

// A declared key with the type of its settings erased.
struct AnyKey {
  std::string_view name;
  config::Need need;
  std::string_view type;
  std::string_view default_text;
  std::string_view description;
  std::function<bool(const config::Field&, config::SourceSettings&)> read;
};

struct SourceType {
  std::string_view name;  // as written in `type:`
  bool periodic = true;   // collected every `interval`; false: the type has no interval (execd)
  std::vector<AnyKey> keys;
  std::function<std::unique_ptr<config::SourceSettings>()> make;            // before defaults
  std::function<void(const CheckContext&, config::SourceSettings&)> check;  // may be empty
  std::function<bool(const config::SourceSettings&)> owns;  // settings of this type?
  Factory create;
};

enum class Collection { Periodic, Push };

// A type from its settings struct S (derived from config::SettingsOf<S>), its table and factory.
template <class S>
SourceType declare(std::string_view name, Collection collection, const config::Keys<S>& keys,
                   Factory create, std::function<void(const CheckContext&, S&)> check = {}) {
  SourceType t;
  t.name = name;
  t.periodic = collection == Collection::Periodic;
  for (const auto& k : keys) {
    t.keys.push_back({k.name, k.need, k.type, k.default_text, k.description,
                      [read = k.read](const config::Field& f, config::SourceSettings& s) {
                        return read(f, static_cast<S&>(s));
                      }});
  }
  t.make = [] { return std::make_unique<S>(); };
  if (check) {
    t.check = [check](const CheckContext& c, config::SourceSettings& s) {
      check(c, static_cast<S&>(s));
    };
  }
  t.owns = [](const config::SourceSettings& s) { return dynamic_cast<const S*>(&s) != nullptr; };
  t.create = create;
  return t;
}

// The keys every source has (name, type and, for periodic types, interval).
const config::Keys<config::SourceCommon>& common_keys();
// Every type, in the order messages list them.
const std::vector<const SourceType*>& all_types();
const SourceType* find_type(std::string_view name);
// What config::load_file needs to read the sources' keys.
const config::SourceTypes& source_types();

// Checks a `timeout` against `interval` (exec, plugin): without one given, a short interval is
// the timeout; a longer one given is an error (runs would overlap).
void fit_timeout(const CheckContext& c, Millis& timeout);

}  // namespace tb::sources
