#include "daemon/status_report.hpp"

#include <nlohmann/json.hpp>

#include <string_view>
#include <vector>

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

namespace {

using Json = nlohmann::ordered_json;

// One part of the report: its label and lines in the human summary (a second line and later are
// continuation lines, without the label), and the keys it adds to the JSON object. Both outputs
// walk kReport, so a new status field is one entry here.
struct ReportField {
  std::string_view label;
  std::vector<std::string> (*human)(const dbus::Status&, std::uint64_t now_us);
  void (*json)(const dbus::Status&, std::uint64_t now_us, Json& out);
};

std::string source_line(const dbus::SourceRow& src, std::uint64_t now_us) {
  std::string text = src.name + " (" + src.type + ", every " +
                     format_duration(Millis(static_cast<std::int64_t>(src.interval_usec / 1000))) +
                     "): " + plural(src.readings, "reading", "readings") + ", " +
                     plural(src.errors, "error", "errors") + ", last read " +
                     format_ago(src.last_reading_time, now_us);
  if (!src.last_error.empty()) text += "; error: " + src.last_error;
  return text;
}

const ReportField kReport[] = {
    {"State",
     [](const dbus::Status& s, std::uint64_t) -> std::vector<std::string> {
       const std::string reason = why(s);
       return {reason.empty() ? s.state : s.state + " (" + reason + ")"};
     },
     [](const dbus::Status& s, std::uint64_t, Json& j) {
       j["state"] = s.state;
       j["status_text"] = s.status_text;
     }},
    {"Device",
     [](const dbus::Status& s, std::uint64_t) -> std::vector<std::string> {
       return {s.device_name + (s.provisioned ? " (provisioned)" : " (not provisioned)")};
     },
     [](const dbus::Status& s, std::uint64_t, Json& j) {
       j["device_name"] = s.device_name;
       j["provisioned"] = s.provisioned;
     }},
    {"Server",
     [](const dbus::Status& s, std::uint64_t) -> std::vector<std::string> { return {s.server}; },
     [](const dbus::Status& s, std::uint64_t, Json& j) { j["server"] = s.server; }},
    {"Readings",
     [](const dbus::Status& s, std::uint64_t) -> std::vector<std::string> {
       return {std::to_string(s.queued_readings) + " queued, " + std::to_string(s.sent_readings) +
               " sent, " + std::to_string(s.dropped_readings) + " dropped"};
     },
     [](const dbus::Status& s, std::uint64_t, Json& j) {
       j["queued_readings"] = s.queued_readings;
       j["sent_readings"] = s.sent_readings;
       j["dropped_readings"] = s.dropped_readings;
     }},
    {"Last success",
     [](const dbus::Status& s, std::uint64_t now) -> std::vector<std::string> {
       return {format_ago(s.last_success_time, now)};
     },
     [](const dbus::Status& s, std::uint64_t now, Json& j) {
       j["last_success_time_us"] = s.last_success_time;
       j["last_success_age_s"] = age_seconds(s.last_success_time, now);
     }},
    {"Last error",
     [](const dbus::Status& s, std::uint64_t) -> std::vector<std::string> {
       return {s.last_error.empty() ? "none" : s.last_error};
     },
     [](const dbus::Status& s, std::uint64_t, Json& j) { j["last_error"] = s.last_error; }},
    {"Downlink",
     [](const dbus::Status& s, std::uint64_t) -> std::vector<std::string> {
       if (s.attributes_observation.empty() && s.rpc_observation.empty()) return {"not started"};
       return {"attributes " + s.attributes_observation + ", RPC " + s.rpc_observation};
     },
     [](const dbus::Status& s, std::uint64_t, Json& j) {
       j["attributes_observation"] = s.attributes_observation;
       j["rpc_observation"] = s.rpc_observation;
     }},
    {"Last RPC",
     [](const dbus::Status& s, std::uint64_t) -> std::vector<std::string> {
       return {s.last_rpc.empty() ? "none" : s.last_rpc};
     },
     [](const dbus::Status& s, std::uint64_t, Json& j) { j["last_rpc"] = s.last_rpc; }},
    {"Remote",
     [](const dbus::Status& s, std::uint64_t) -> std::vector<std::string> {
       return {s.last_remote_change.empty() ? "no change" : s.last_remote_change};
     },
     [](const dbus::Status& s, std::uint64_t, Json& j) {
       j["last_remote_change"] = s.last_remote_change;
     }},
    {"Sources",
     [](const dbus::Status& s, std::uint64_t now) -> std::vector<std::string> {
       if (s.sources.empty()) return {"none running"};
       std::vector<std::string> lines;
       for (const auto& src : s.sources) lines.push_back(source_line(src, now));
       return lines;
     },
     [](const dbus::Status& s, std::uint64_t now, Json& j) {
       j["sources"] = Json::array();
       for (const auto& src : s.sources) {
         Json o;
         o["name"] = src.name;
         o["type"] = src.type;
         o["interval_us"] = src.interval_usec;
         o["readings"] = src.readings;
         o["errors"] = src.errors;
         o["last_reading_time_us"] = src.last_reading_time;
         o["last_reading_age_s"] = age_seconds(src.last_reading_time, now);
         o["last_error"] = src.last_error;
         j["sources"].push_back(std::move(o));
       }
     }},
};

}  // namespace

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
  for (const ReportField& f : kReport) {
    bool first = true;
    for (const std::string& text : f.human(s, now_us)) {
      out += line(first ? f.label : "", text);
      first = false;
    }
  }
  return out;
}

std::string format_status_json(const dbus::Status& s, std::uint64_t now_us) {
  Json j;
  for (const ReportField& f : kReport) f.json(s, now_us, j);
  // Replace invalid UTF-8 (a source's error text may quote bytes it read) instead of throwing.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace tb::daemon
