// The client side of io.tbagent.Agent1, for the command line (`tb-agent status`, `tb-agent
// reload`): short blocking calls with a bounded timeout, no event loop. Only dbus/ includes
// sd-bus; callers see the same dbus::Status the service publishes.
#pragma once

#include <chrono>
#include <string>

#include "config/config.hpp"
#include "dbus/status_service.hpp"

namespace tb::dbus {

enum class CallResult {
  Ok,
  // Nobody answers: the bus cannot be reached, or no process owns io.tbagent.Agent1 on it.
  NoAgent,
  // Reload(): the agent refused the configuration (io.tbagent.Agent1.Error.InvalidConfig);
  // *error holds every problem, one per line.
  Refused,
  // Anything else (access denied, timeout, a malformed reply); *error says what.
  Failed,
};

// Reads every property with one GetAll. Properties this client does not know are ignored and
// the ones an older agent lacks stay at their defaults, so either side may be newer.
CallResult read_status(config::BusKind bus, Status* out, std::string* error,
                       std::chrono::milliseconds timeout = std::chrono::seconds(10));

// Calls Reload() and waits for its answer (the agent answers once the new configuration is
// applied or refused).
CallResult call_reload(config::BusKind bus, std::string* error,
                       std::chrono::milliseconds timeout = std::chrono::seconds(30));

}  // namespace tb::dbus
