#include "config/schema.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "util/units.hpp"
#include "util/utf8.hpp"

namespace tb::config {

namespace {

std::string number_text(double d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", d);
  return buf;
}

// The text of a scalar value, or nullopt after reporting why there is none.
std::optional<std::string> scalar(const Field& f, std::string_view expected) {
  if (f.value.is_scalar()) return f.value.text;
  if (f.value.is_null())
    f.error("has no value; expected " + std::string(expected));
  else
    f.error("expected " + std::string(expected) + ", not " + kind(f.value));
  return std::nullopt;
}

}  // namespace

const char* kind(const Value& v) {
  if (v.is_scalar()) return "a single value";
  if (v.list()) return "a list";
  if (v.map()) return "a map";
  return "nothing";
}

std::string shown(std::string_view s) {
  // Cut on a character boundary: half a character would make the message invalid UTF-8, and
  // messages travel on to D-Bus (LastError, Reload's error) and the journal.
  const std::string_view cut = utf8::prefix(s, 60);
  std::string out = "'";
  for (const char ch : cut) {
    const auto c = static_cast<unsigned char>(ch);
    out += (c < 0x20 || c == 0x7f) ? '?' : ch;
  }
  if (cut.size() < s.size()) out += "...";
  return utf8::sanitized(out + "'");
}

// A "key" with spaces or punctuation is usually several lines run together by a quote or
// indentation slip, and may hold a secret's line.
bool looks_like_key(std::string_view name) {
  if (name.empty() || name.size() > 40) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-' || c == '.';
  });
}

Value scalar_value(std::string_view text) {
  Value v;
  v.data = std::string(text);
  v.text = std::string(text);
  return v;
}

std::string check_absolute(const std::string& v) {
  if (v.empty() || v.front() != '/')
    return "must be an absolute path (starting with /), not " + shown(v);
  return "";
}

std::string check_printable(const std::string& v) {
  for (char c : v) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) return "must not contain control characters";
  }
  return "";
}

Parse<std::string> text(Check check) {
  return [check](const Field& f) -> std::optional<std::string> {
    auto v = scalar(f, "a string");
    if (!v) return std::nullopt;
    if (v->empty()) {
      f.error("must not be empty");
      return std::nullopt;
    }
    if (check) {
      if (auto problem = check(*v); !problem.empty()) {
        f.error(problem);
        return std::nullopt;
      }
    }
    return v;
  };
}

Parse<Millis> duration(Millis lo, Millis hi) {
  return [lo, hi](const Field& f) -> std::optional<Millis> {
    auto v = scalar(f, "a duration (e.g. 30s)");
    if (!v) return std::nullopt;
    std::string error;
    const auto d = parse_duration(*v, &error);
    if (!d) {
      f.error(error);
      return std::nullopt;
    }
    if (*d < lo || *d > hi) {
      const std::string range = hi == Millis::max()
                                    ? "at least " + format_duration(lo)
                                    : "from " + format_duration(lo) + " to " + format_duration(hi);
      f.error("must be " + range + ", not " + shown(*v));
      return std::nullopt;
    }
    return d;
  };
}

Parse<double> number(double lo, double hi) {
  return [lo, hi](const Field& f) -> std::optional<double> {
    auto v = scalar(f, "a number");
    if (!v) return std::nullopt;
    std::string_view s = *v;
    if (!s.empty() && s.front() == '+') s.remove_prefix(1);  // YAML allows "+1.5"
    double d = 0;
    const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), d);
    if (s.empty() || ec != std::errc() || p != s.data() + s.size() || !std::isfinite(d)) {
      f.error("must be a number, not " + shown(*v));
      return std::nullopt;
    }
    if (d < lo || d > hi) {
      f.error("must be from " + number_text(lo) + " to " + number_text(hi) + ", not " + shown(*v));
      return std::nullopt;
    }
    return d;
  };
}

Parse<std::vector<std::string>> program_argv() {
  return [](const Field& f) -> std::optional<std::vector<std::string>> {
    const Value::List* list = f.value.list();
    if (!list) {
      f.error("expected a list of strings (program and arguments; no shell), not " +
              std::string(kind(f.value)));
      return std::nullopt;
    }
    if (list->empty()) {
      f.error("must name at least the program to run");
      return std::nullopt;
    }
    std::vector<std::string> argv;
    bool ok = true;
    for (std::size_t i = 0; i < list->size(); ++i) {
      const Value& arg = (*list)[i];
      const std::string path = f.path + "[" + std::to_string(i) + "]";
      if (!arg.is_scalar()) {
        f.report.error(arg.is_null() ? f.value.position : arg.position,
                       path + ": expected a string, not " + kind(arg));
        ok = false;
      } else if (i == 0 && arg.text.empty()) {
        f.report.error(arg.position, path + ": the program must not be empty");
        ok = false;
      } else {
        argv.push_back(arg.text);
      }
    }
    if (!ok) return std::nullopt;
    return argv;
  };
}

Parse<std::vector<std::string>> string_list(std::string_view plural, std::string_view one,
                                            Check check, bool unique) {
  return [plural = std::string(plural), what = std::string(one), check,
          unique](const Field& f) -> std::optional<std::vector<std::string>> {
    const Value::List* list = f.value.list();
    if (!list || list->empty()) {
      f.error("expected a non-empty list of " + plural + ", not " +
              (list ? "an empty list" : kind(f.value)));
      return std::nullopt;
    }
    std::vector<std::string> out;
    for (std::size_t i = 0; i < list->size(); ++i) {
      const Value& n = (*list)[i];
      const std::string path = f.path + "[" + std::to_string(i) + "]";
      if (!n.is_scalar() || n.text.empty()) {
        f.report.error(n.is_null() ? f.value.position : n.position,
                       path + ": expected " + what + ", not " + kind(n));
        return std::nullopt;
      }
      if (check) {
        if (auto problem = check(n.text); !problem.empty()) {
          f.report.error(n.position, path + ": " + problem);
          return std::nullopt;
        }
      }
      if (unique && std::find(out.begin(), out.end(), n.text) != out.end()) {
        f.report.error(n.position, path + ": " + shown(n.text) + " is listed twice");
        return std::nullopt;
      }
      out.push_back(n.text);
    }
    return out;
  };
}

}  // namespace tb::config
