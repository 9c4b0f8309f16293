// What io.tbagent.Agent1 publishes (docs/dbus.md): the status struct and the one table that
// declares every property. The service's vtable, its getters and its PropertiesChanged diff,
// and the client's GetAll reader are all driven by kProperties, so a new property is one field
// here, one row in kProperties and one <property> in systemd/io.tbagent.Agent1.xml (the unit
// test holds the vtable to the XML). No sd-bus here: the daemon builds a Status without it.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace tb::dbus {

// One element of the `Sources` property, D-Bus signature (sstttts):
// name, type, interval (µs), readings collected, errors, time of the last successful reading
// (µs since the Unix epoch, 0 = never), last error ("" = none).
struct SourceRow {
  std::string name;
  std::string type;
  std::uint64_t interval_usec = 0;
  std::uint64_t readings = 0;
  std::uint64_t errors = 0;
  std::uint64_t last_reading_time = 0;
  std::string last_error;
  bool operator==(const SourceRow&) const = default;
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
  // What the state means right now, the same sentence as sd_notify STATUS= ("retrying in 4s: …").
  std::string status_text;
  // The downlink (docs/attributes.md): each observation's state ("observing",
  // "registering", "retrying in 4s: …"; "" before there is a token), the last server-side RPC
  // and how it ended, the last shared-attribute change applied or refused.
  std::string attributes_observation;
  std::string rpc_observation;
  std::string last_rpc;
  std::string last_remote_change;
  bool operator==(const Status&) const = default;
};

// When a change is signalled: at once, or at most once per second (docs/interface.md allows
// rate-limiting counters; anything that moves with every reading is Throttled).
enum class Signal { Immediate, Throttled };

// Which Status member a property shows; the D-Bus type follows from the member's type.
using Field = std::variant<std::string Status::*, bool Status::*, std::uint64_t Status::*,
                           std::vector<SourceRow> Status::*>;

struct Property {
  std::string_view name;
  Field field;
  Signal signal;
};

inline constexpr std::string_view kSourceRowSignature = "(sstttts)";

// The D-Bus signature of a property's value.
constexpr std::string_view signature(const Field& f) {
  switch (f.index()) {
    case 0:
      return "s";
    case 1:
      return "b";
    case 2:
      return "t";
    default:
      return "a(sstttts)";
  }
}

// Every property, in vtable (and introspection) order.
inline constexpr std::array kProperties = {
    Property{"State", &Status::state, Signal::Immediate},
    Property{"DeviceName", &Status::device_name, Signal::Immediate},
    Property{"Provisioned", &Status::provisioned, Signal::Immediate},
    Property{"Server", &Status::server, Signal::Immediate},
    Property{"QueuedReadings", &Status::queued_readings, Signal::Throttled},
    Property{"SentReadings", &Status::sent_readings, Signal::Throttled},
    Property{"DroppedReadings", &Status::dropped_readings, Signal::Throttled},
    Property{"LastSuccessTime", &Status::last_success_time, Signal::Immediate},
    Property{"LastError", &Status::last_error, Signal::Immediate},
    Property{"Sources", &Status::sources, Signal::Throttled},
    // The text carries counters ("delivering 12 queued reading(s)"): rate-limited with them.
    Property{"StatusText", &Status::status_text, Signal::Throttled},
    Property{"AttributesObservation", &Status::attributes_observation, Signal::Immediate},
    Property{"RpcObservation", &Status::rpc_observation, Signal::Immediate},
    Property{"LastRpc", &Status::last_rpc, Signal::Immediate},
    Property{"LastRemoteChange", &Status::last_remote_change, Signal::Immediate},
};

// The property's value in `a` differs from the one in `b`.
inline bool differs(const Property& p, const Status& a, const Status& b) {
  return std::visit([&](auto member) { return a.*member != b.*member; }, p.field);
}

// Copies the property's value from `from` to `to`.
inline void copy(const Property& p, const Status& from, Status& to) {
  std::visit([&](auto member) { to.*member = from.*member; }, p.field);
}

}  // namespace tb::dbus
