#include "daemon/status_report.hpp"

#include <nlohmann/json.hpp>

#include <string_view>

#include "util/clock.hpp"
#include "util/units.hpp"

namespace tb::daemon {

namespace {

std::string plural(std::uint64_t n, std::string_view one, std::string_view many) {
  return std::to_string(n) + " " + std::string(n == 1 ? one : many);
}

// "why" for the state line: the status text without a leading "<state>: " that would repeat it.
std::string why(const dbus::Status& s) {
  const std::string& text = s.status_text;
  if (text == s.state) return "";
  const std::string prefix = s.state + ": ";
  if (text.rfind(prefix, 0) == 0) return text.substr(prefix.size());
  return text;
}

// Seconds since `then_us`, or null when it never happened (0).
nlohmann::json age_seconds(std::uint64_t then_us, std::uint64_t now_us) {
  if (then_us == 0) return nullptr;
  return now_us > then_us ? (now_us - then_us) / 1'000'000 : 0;
}

}  // namespace

std::string format_ago(std::uint64_t then_us, std::uint64_t now_us) {
  if (then_us == 0) return "never";
  // A clock step can put `then` in the future; it is then "just now", not a wrapped number.
  const std::uint64_t s = now_us > then_us ? (now_us - then_us) / 1'000'000 : 0;
  if (s < 120) return std::to_string(s) + " s ago";
  if (s < 120 * 60) return std::to_string(s / 60) + " min ago";
  if (s < 48 * 3600) return std::to_string(s / 3600) + " h ago";
  return std::to_string(s / 86400) + " d ago";
}

std::string format_status(const dbus::Status& s, std::uint64_t now_us) {
  // Labels right-aligned on the colon, as timedatectl and hostnamectl do.
  auto line = [](std::string_view label, const std::string& value) {
    constexpr std::size_t kWidth = 12;  // "Last success"
    std::string out(kWidth > label.size() ? kWidth - label.size() : 0, ' ');
    out += label;
    out += label.empty() ? "  " : ": ";  // a continuation line: no colon
    out += value;
    out += '\n';
    return out;
  };
  std::string out;
  const std::string reason = why(s);
  out += line("State", reason.empty() ? s.state : s.state + " (" + reason + ")");
  out += line("Device", s.device_name + (s.provisioned ? " (provisioned)" : " (not provisioned)"));
  out += line("Server", s.server);
  out += line("Readings", std::to_string(s.queued_readings) + " queued, " +
                              std::to_string(s.sent_readings) + " sent, " +
                              std::to_string(s.dropped_readings) + " dropped");
  out += line("Last success", format_ago(s.last_success_time, now_us));
  out += line("Last error", s.last_error.empty() ? "none" : s.last_error);
  if (s.sources.empty()) {
    out += line("Sources", "none running");
    return out;
  }
  bool first = true;
  for (const auto& src : s.sources) {
    std::string text =
        src.name + " (" + src.type + ", every " +
        format_duration(Millis(static_cast<std::int64_t>(src.interval_usec / 1000))) +
        "): " + plural(src.readings, "reading", "readings") + ", " +
        plural(src.errors, "error", "errors") + ", last read " +
        format_ago(src.last_reading_time, now_us);
    if (!src.last_error.empty()) text += "; error: " + src.last_error;
    out += line(first ? "Sources" : "", text);
    first = false;
  }
  return out;
}

std::string format_status_json(const dbus::Status& s, std::uint64_t now_us) {
  nlohmann::ordered_json j;
  j["state"] = s.state;
  j["status_text"] = s.status_text;
  j["device_name"] = s.device_name;
  j["provisioned"] = s.provisioned;
  j["server"] = s.server;
  j["queued_readings"] = s.queued_readings;
  j["sent_readings"] = s.sent_readings;
  j["dropped_readings"] = s.dropped_readings;
  j["last_success_time_us"] = s.last_success_time;
  j["last_success_age_s"] = age_seconds(s.last_success_time, now_us);
  j["last_error"] = s.last_error;
  j["sources"] = nlohmann::ordered_json::array();
  for (const auto& src : s.sources) {
    nlohmann::ordered_json o;
    o["name"] = src.name;
    o["type"] = src.type;
    o["interval_us"] = src.interval_usec;
    o["readings"] = src.readings;
    o["errors"] = src.errors;
    o["last_reading_time_us"] = src.last_reading_time;
    o["last_reading_age_s"] = age_seconds(src.last_reading_time, now_us);
    o["last_error"] = src.last_error;
    j["sources"].push_back(std::move(o));
  }
  // Replace invalid UTF-8 (a source's error text may quote bytes it read) instead of throwing.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace tb::daemon
