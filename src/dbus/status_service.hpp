// The io.tbagent.Agent1 status object (docs/interface.md, "D-Bus"). Only dbus/ includes sd-bus.
// The daemon hands in a function that snapshots its status; changed() compares with the last
// snapshot and emits PropertiesChanged for what differs (counters at most once per second).
// Every property is declared once, in dbus/status.hpp (kProperties).
// systemd/io.tbagent.Agent1.xml is the contract; tests/unit/dbus holds the vtable to it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <systemd/sd-event.h>

#include "config/config.hpp"
#include "dbus/status.hpp"

namespace tb::dbus {

inline constexpr const char* kBusName = "io.tbagent.Agent1";
inline constexpr const char* kObjectPath = "/io/tbagent/Agent1";
inline constexpr const char* kInterface = "io.tbagent.Agent1";
inline constexpr const char* kErrorInvalidConfig = "io.tbagent.Agent1.Error.InvalidConfig";
inline constexpr const char* kErrorFailed = "io.tbagent.Agent1.Error.Failed";

// architecture.md "One loop": signals (-100) > bus > CoAP I/O (0) > delivery > collection, so a
// status query is answered even while a backlog is being pushed.
inline constexpr int kBusPriority = -50;

struct Handlers {
  std::function<void()> flush;
  // Returns the empty string on success, else every problem (the method call fails with
  // io.tbagent.Agent1.Error.InvalidConfig and this text).
  std::function<std::string()> reload;
  // Optional: told, for each connection made (the first and every reconnect), whether the bus
  // name was acquired (error says why not). The object is served on the connection either way;
  // only the well-known name is missing on failure.
  std::function<void(bool owned, const std::string& error)> name_result;
};

class StatusService {
 public:
  // Connects to `bus` (System: sd_bus_open_system, honouring DBUS_SYSTEM_BUS_ADDRESS; Session:
  // sd_bus_open_user, honouring DBUS_SESSION_BUS_ADDRESS), attaches it to `loop` at kBusPriority,
  // registers the object and requests the name asynchronously. If the bus cannot be reached, or
  // the connection is lost later (dbus-daemon restarted), it logs that and connects again with
  // capped backoff (1 s doubling to 1 min); the rest of the daemon is unaffected.
  // `snapshot` is called on the loop thread, from changed() and from property getters.
  // Returns nullptr (with *error) only for BusKind::None, which is a caller error (the daemon
  // simply does not create the service), and for failures to set up the loop's timers.
  static std::unique_ptr<StatusService> create(sd_event* loop, config::BusKind bus,
                                               std::function<Status()> snapshot, Handlers handlers,
                                               std::string* error);
  ~StatusService();
  StatusService(const StatusService&) = delete;
  StatusService& operator=(const StatusService&) = delete;

  // Something may have changed: emit PropertiesChanged for what did. Never throws.
  void changed();
  // False while there is no bus connection (not made yet, or lost and not yet made again).
  bool connected() const;

 private:
  struct Impl;
  explicit StatusService(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tb::dbus
