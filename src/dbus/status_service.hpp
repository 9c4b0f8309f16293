// The io.tbagent.Agent1 status object (interface.md, "D-Bus"). Only dbus/ includes sd-bus.
// The daemon hands in a function that snapshots its status; changed() compares with the last
// snapshot and emits PropertiesChanged for what differs (counters at most once per second).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <systemd/sd-event.h>

#include "config/config.hpp"

namespace tb::dbus {

inline constexpr const char* kBusName = "io.tbagent.Agent1";
inline constexpr const char* kObjectPath = "/io/tbagent/Agent1";
inline constexpr const char* kInterface = "io.tbagent.Agent1";

struct SourceRow {
  std::string name;
  std::string type;
  std::uint64_t interval_usec = 0;
  std::uint64_t readings = 0;
  std::uint64_t errors = 0;
  std::string last_error;
};

struct Status {
  std::string state = "starting";
  std::string device_name;
  bool provisioned = false;
  std::string server;  // host:port
  std::uint64_t queued_readings = 0;
  std::uint64_t sent_readings = 0;
  std::uint64_t dropped_readings = 0;
  std::uint64_t last_success_time = 0;  // µs since the epoch; 0 = never
  std::string last_error;
  std::vector<SourceRow> sources;
};

struct Handlers {
  std::function<void()> flush;
  // Returns the empty string on success, else every problem (the method call fails with it).
  std::function<std::string()> reload;
};

class StatusService {
 public:
  static std::unique_ptr<StatusService> create(sd_event* loop, config::BusKind bus,
                                               std::function<Status()> snapshot, Handlers handlers,
                                               std::string* error);
  ~StatusService();
  // Something may have changed: emit PropertiesChanged for what did.
  void changed();

 private:
  struct Impl;
  explicit StatusService(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tb::dbus
