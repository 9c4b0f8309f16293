// `tb-agent status`: what the running agent publishes on D-Bus (dbus::Status), as a summary for
// an operator at a terminal (in the manner of `timedatectl` and `chronyc tracking`) or as one
// JSON object for scripts. Pure functions of the status and the current time, so tests pin both.
#pragma once

#include <cstdint>
#include <string>

#include "dbus/status_service.hpp"

namespace tb::daemon {

// "12 s ago", "5 min ago", "3 h ago", "2 d ago"; "never" for 0. Times are µs since the epoch.
std::string format_ago(std::uint64_t then_us, std::uint64_t now_us);

// The human summary, one "Label: value" line each, then one line per source. Ends in '\n'.
std::string format_status(const dbus::Status& s, std::uint64_t now_us);

// The same as one JSON object (docs/man/tb-agent.8 lists the keys). No trailing newline.
std::string format_status_json(const dbus::Status& s, std::uint64_t now_us);

}  // namespace tb::daemon
