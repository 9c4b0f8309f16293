// Declaration tables of keys over a config::Value tree (Fluent Bit's per-plugin config map is the
// model): each source type in src/sources/ declares its keys in one table of Key rows — name,
// whether required, type and default as the docs show them, the reader that checks and stores
// the value, and a one-line description. The readers here report every problem as
// "PATH: message" at the value's position, as the rest of the loader does.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "config/config.hpp"

namespace tb::config {

// One key's value, as a reader gets it.
struct Field {
  const Value& value;
  Position key_position;
  std::string path;  // what messages call it: "sources[0].interval"
  Report& report;

  // An empty value (`key:`) has no position of its own worth showing: point at the key.
  Position where() const { return value.is_null() ? key_position : value.position; }
  void error(const std::string& message) const { report.error(where(), path + ": " + message); }
};

enum class Need { Optional, Required };

// Reads, checks and stores one value into S; false after reporting why not.
template <class S>
using Read = std::function<bool(const Field&, S&)>;

template <class S>
struct Key {
  std::string_view name;
  Need need;
  std::string_view type;          // as the docs name it: "duration, at least 100ms"
  std::string_view default_text;  // YAML text read like a value when the key is absent; "" = none
  Read<S> read;
  std::string_view description;  // one line
};

template <class S>
using Keys = std::vector<Key<S>>;

// A reader of one kind of value: the value, or nullopt after reporting.
template <class T>
using Parse = std::function<std::optional<T>(const Field&)>;

// Stores what `parse` reads in `field`.
template <class S, class T>
Read<S> into(T S::*field, std::type_identity_t<Parse<T>> parse) {
  return [field, parse](const Field& f, S& out) {
    auto v = parse(f);
    if (!v) return false;
    out.*field = std::move(*v);
    return true;
  };
}

using Check = std::function<std::string(const std::string&)>;  // "" = fine, else a sentence

// A non-empty string (any scalar, as written), then `check`.
Parse<std::string> text(Check check = {});
// At least `lo` and at most `hi`.
Parse<Millis> duration(Millis lo, Millis hi);
// A finite number from lo to hi.
Parse<double> number(double lo, double hi);
// A non-empty list of non-empty strings, each passing `check`, none twice when `unique`.
// Messages call them `plural` ("absolute paths") and one of them `one` ("an absolute path").
Parse<std::vector<std::string>> string_list(std::string_view plural, std::string_view one,
                                            Check check = {}, bool unique = false);

// A program's argv, run without a shell (exec and execd sources, RPC methods): a non-empty list of
// strings whose first, the program, is not empty.
Parse<std::vector<std::string>> program_argv();

std::string check_absolute(const std::string& v);
std::string check_printable(const std::string& v);

// "nothing", "a single value", "a list", "a map".
const char* kind(const Value& v);
// A user's value quoted back in a message: cut short, without control characters.
std::string shown(std::string_view s);
// Whether an unknown key is worth quoting back (see config.cpp).
bool looks_like_key(std::string_view name);
// A scalar Value holding `text` as written, unquoted (defaults are read through the same readers).
Value scalar_value(std::string_view text);

}  // namespace tb::config
