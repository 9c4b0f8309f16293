#include "dbus/status_service.hpp"

#include <spdlog/spdlog.h>
#include <systemd/sd-bus.h>

#include "util/backoff.hpp"
#include "util/utf8.hpp"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace tb::dbus {

namespace {

// Counters change with every reading; peers hear of them at most once per second
// (docs/interface.md allows rate-limiting counters).
constexpr std::uint64_t kCounterIntervalUsec = 1'000'000;

// When the bus is lost (dbus-daemon restarted or not up yet), connect again after up to 1 s,
// the ceiling doubling to 1 min (full jitter, util/backoff.hpp): the status comes back on its own,
// without restarting the agent, and a bus that stays away costs one attempt a minute.
constexpr Millis kReconnectInitial{1000};
constexpr Millis kReconnectMax{60'000};

std::string errno_text(int r) { return std::strerror(r < 0 ? -r : r); }

// sd-bus refuses a message with a string that is not UTF-8, and with it the whole GetAll, the
// PropertiesChanged signal or the method reply. A status string can come from anywhere (a device
// name in an old credentials.json, a source's error quoting a file, a plugin), so every string is
// made valid here, at the boundary: bad bytes become U+FFFD.
void make_valid(std::string& s) {
  if (!utf8::valid(s)) s = utf8::sanitized(s);
}

Status valid_utf8(Status s) {
  for (const Property& p : kProperties) {
    if (auto* m = std::get_if<std::string Status::*>(&p.field)) make_valid(s.**m);
  }
  for (auto& row : s.sources) {
    for (std::string* f : {&row.name, &row.type, &row.last_error}) make_valid(*f);
  }
  return s;
}

}  // namespace

struct StatusService::Impl {
  sd_event* loop = nullptr;
  config::BusKind kind = config::BusKind::System;
  sd_bus* bus = nullptr;
  sd_event_source* counter_timer = nullptr;
  sd_event_source* reconnect_timer = nullptr;
  Backoff reconnect_backoff{kReconnectInitial, kReconnectMax};
  std::string last_connect_error;  // logged once per distinct error, not per attempt
  std::function<Status()> snapshot;
  Handlers handlers;

  // What getters serve: refreshed by changed() and, at most once per loop iteration, by a getter,
  // so a GetAll costs one snapshot and a Get is never staler than the current iteration.
  Status current;
  std::uint64_t current_iteration = UINT64_MAX;
  // The values peers last heard of (initially what they could read at registration).
  Status emitted;
  std::uint64_t last_counter_emit = 0;  // CLOCK_MONOTONIC µs; 0 = never
  bool is_connected = false;
  // The broker answered this connection's name request: it is up, not just opened. Only then is
  // the reconnect backoff reset, so a broker that drops us right away is retried with backoff.
  bool established = false;

  ~Impl() {
    sd_event_source_disable_unref(counter_timer);
    sd_event_source_disable_unref(reconnect_timer);
    // Flushes the last PropertiesChanged (e.g. State=stopping) before closing. The bus is
    // detached from the loop on close, so no callback with `this` can run afterwards.
    if (bus) sd_bus_flush_close_unref(bus);
  }

  const Status& latest() {
    std::uint64_t it = 0;
    if (sd_event_get_iteration(loop, &it) < 0 || it != current_iteration) {
      current = valid_utf8(snapshot());
      current_iteration = it;
    }
    return current;
  }

  void refresh() {
    current = valid_utf8(snapshot());
    std::uint64_t it = UINT64_MAX;
    sd_event_get_iteration(loop, &it);
    current_iteration = it;
  }

  std::uint64_t now_monotonic() const {
    std::uint64_t now = 0;
    sd_event_now(loop, CLOCK_MONOTONIC, &now);
    return now;
  }

  // Emits one PropertiesChanged for `names` (nullptr-terminated), with the values from `current`.
  void emit(std::vector<const char*>& names) {
    if (names.empty() || !is_connected) return;
    names.push_back(nullptr);
    const int r = sd_bus_emit_properties_changed_strv(bus, kObjectPath, kInterface,
                                                      const_cast<char**>(names.data()));
    if (r < 0) spdlog::warn("D-Bus: cannot emit PropertiesChanged: {}", errno_text(r));
  }

  bool counters_differ() const {
    for (const Property& p : kProperties)
      if (p.signal == Signal::Throttled && differs(p, current, emitted)) return true;
    return false;
  }

  // Names of the properties of kind `signal` that differ from what peers last heard; they are
  // taken as heard.
  void take(Signal signal, std::vector<const char*>& names) {
    for (const Property& p : kProperties) {
      if (p.signal != signal || !differs(p, current, emitted)) continue;
      names.push_back(p.name.data());  // string literals: NUL-terminated
      copy(p, current, emitted);
    }
  }

  void take_counters(std::vector<const char*>& names) {
    take(Signal::Throttled, names);
    last_counter_emit = now_monotonic();
  }

  void changed() {
    refresh();
    if (!is_connected) return;
    std::vector<const char*> names;
    take(Signal::Immediate, names);

    if (counters_differ()) {
      const std::uint64_t now = now_monotonic();
      if (last_counter_emit == 0 || now >= last_counter_emit + kCounterIntervalUsec) {
        take_counters(names);
      } else {
        // Within the second: the timer sends whatever the counters are when it is up, so the
        // final value always arrives even if nothing calls changed() again.
        arm_counter_timer(last_counter_emit + kCounterIntervalUsec);
      }
    }
    emit(names);
  }

  void arm_counter_timer(std::uint64_t due) {
    int enabled = SD_EVENT_OFF;
    sd_event_source_get_enabled(counter_timer, &enabled);
    if (enabled != SD_EVENT_OFF) return;
    sd_event_source_set_time(counter_timer, due);
    sd_event_source_set_enabled(counter_timer, SD_EVENT_ONESHOT);
  }

  void counters_due() {
    refresh();
    if (!is_connected || !counters_differ()) return;
    std::vector<const char*> names;
    take_counters(names);
    emit(names);
  }

  const char* bus_kind() const { return kind == config::BusKind::System ? "system" : "session"; }

  // Opens the bus, serves the object on it and asks for the name (asynchronously: start-up never
  // waits on the broker). On failure nothing is left half set up.
  bool connect(std::string* error) {
    auto fail = [&](const std::string& what, int r) {
      *error = what + ": " + errno_text(r);
      if (bus) bus = sd_bus_close_unref(bus);
      return false;
    };
    int r = kind == config::BusKind::System ? sd_bus_open_system(&bus) : sd_bus_open_user(&bus);
    if (r < 0) {
      bus = nullptr;
      return fail(std::string("cannot connect to the ") + bus_kind() + " bus", r);
    }
    sd_bus_set_description(bus, "tb-agent-status");
    // A lost bus must not stop the agent: telemetry matters more than its status display.
    sd_bus_set_exit_on_disconnect(bus, 0);
    r = sd_bus_add_object_vtable(bus, nullptr, kObjectPath, kInterface, Impl::vtable(), this);
    if (r < 0) return fail("cannot register " + std::string(kObjectPath), r);
    r = sd_bus_add_filter(bus, nullptr, &Impl::on_message, this);
    if (r < 0) return fail("cannot add a bus filter", r);
    r = sd_bus_attach_event(bus, loop, kBusPriority);
    if (r < 0) return fail("cannot attach the bus to the event loop", r);
    r = sd_bus_request_name_async(bus, nullptr, kBusName, 0, &Impl::on_name_reply, this);
    if (r < 0) return fail("cannot request the name " + std::string(kBusName), r);
    // Peers on the new connection have heard nothing yet: what they can read (getters always
    // snapshot afresh) is their starting point, and the next changed() signals what differs.
    emitted = current;
    last_counter_emit = 0;
    is_connected = true;
    established = false;
    return true;
  }

  void schedule_reconnect() {
    const Millis delay = reconnect_backoff.next();
    sd_event_source_set_time_relative(
        reconnect_timer, static_cast<std::uint64_t>(
                             std::chrono::duration_cast<std::chrono::microseconds>(delay).count()));
    sd_event_source_set_enabled(reconnect_timer, SD_EVENT_ONESHOT);
  }

  // Called from sd-bus's dispatch of the Disconnected message: the bus is closed later, from the
  // reconnect timer, never inside its own callback.
  void disconnected() {
    if (!is_connected) return;
    is_connected = false;
    sd_event_source_set_enabled(counter_timer, SD_EVENT_OFF);
    if (established)
      spdlog::warn("D-Bus: connection to the {} bus lost; reconnecting (telemetry is not affected)",
                   bus_kind());
    else
      spdlog::debug("D-Bus: the {} bus closed the connection before answering", bus_kind());
    schedule_reconnect();
  }

  void reconnect() {
    if (bus) bus = sd_bus_close_unref(bus);
    std::string err;
    if (connect(&err)) {
      spdlog::debug("D-Bus: connection to the {} bus opened", bus_kind());
      last_connect_error.clear();
      return;
    }
    schedule_reconnect();
    if (err != last_connect_error) {
      spdlog::warn("D-Bus: {}; trying again, at least once a minute", err);
      last_connect_error = err;
    } else {
      spdlog::debug("D-Bus: {}; next attempt within {} s", err,
                    reconnect_backoff.ceiling().count() / 1000);
    }
  }

  // --- C callbacks: each catches everything, nothing unwinds into sd-bus/sd-event. ---

  // Runs a bus call's body; an exception becomes an io.tbagent.Agent1.Error.Failed reply.
  template <typename Body>
  static int guarded(sd_bus_error* error, Body&& body) noexcept {
    try {
      return body();
    } catch (const std::exception& e) {
      return sd_bus_error_set(error, kErrorFailed, utf8::sanitized(e.what()).c_str());
    } catch (...) {
      return sd_bus_error_set(error, kErrorFailed, "internal error");
    }
  }

  static int get_property(sd_bus*, const char*, const char*, const char* property,
                          sd_bus_message* reply, void* userdata, sd_bus_error* error) {
    auto* self = static_cast<Impl*>(userdata);
    return guarded(error, [&]() -> int {
      const Status& s = self->latest();
      const std::string_view name = property;
      for (const Property& p : kProperties) {
        if (p.name == name) return append_value(reply, s, p.field);
      }
      return sd_bus_error_setf(error, SD_BUS_ERROR_UNKNOWN_PROPERTY, "unknown property %s",
                               property);
    });
  }

  static int append_value(sd_bus_message* reply, const Status& s, const Field& field) {
    struct Append {
      sd_bus_message* reply;
      const Status& s;
      int operator()(std::string Status::*m) const {
        return sd_bus_message_append(reply, "s", (s.*m).c_str());
      }
      int operator()(bool Status::*m) const {
        return sd_bus_message_append(reply, "b", (s.*m) ? 1 : 0);
      }
      int operator()(std::uint64_t Status::*m) const {
        return sd_bus_message_append(reply, "t", s.*m);
      }
      int operator()(std::vector<SourceRow> Status::*m) const {
        int r = sd_bus_message_open_container(reply, 'a', "(sstttts)");
        if (r < 0) return r;
        for (const auto& row : s.*m) {
          r = sd_bus_message_append(reply, "(sstttts)", row.name.c_str(), row.type.c_str(),
                                    row.interval_usec, row.readings, row.errors,
                                    row.last_reading_time, row.last_error.c_str());
          if (r < 0) return r;
        }
        return sd_bus_message_close_container(reply);
      }
    };
    return std::visit(Append{reply, s}, field);
  }

  static int method_flush(sd_bus_message* m, void* userdata, sd_bus_error* error) {
    auto* self = static_cast<Impl*>(userdata);
    return guarded(error, [&] {
      if (self->handlers.flush) self->handlers.flush();
      return sd_bus_reply_method_return(m, "");
    });
  }

  static int method_reload(sd_bus_message* m, void* userdata, sd_bus_error* error) {
    auto* self = static_cast<Impl*>(userdata);
    return guarded(error, [&] {
      const std::string problems =
          utf8::sanitized(self->handlers.reload ? self->handlers.reload() : "");
      if (!problems.empty()) return sd_bus_error_set(error, kErrorInvalidConfig, problems.c_str());
      return sd_bus_reply_method_return(m, "");
    });
  }

  static int on_name_reply(sd_bus_message* m, void* userdata, sd_bus_error*) {
    auto* self = static_cast<Impl*>(userdata);
    try {
      const sd_bus_error* e = sd_bus_message_get_error(m);
      // The connection died before the broker answered: disconnected() reports and retries.
      if (e && sd_bus_is_open(self->bus) <= 0) return 0;
      if (!self->established) {
        self->established = true;
        self->reconnect_backoff.reset();
      }
      std::string err;
      if (e) {
        err = std::string(e->name ? e->name : "error") + ": " + (e->message ? e->message : "");
        spdlog::warn(
            "D-Bus: cannot own the name {} ({}); status is still served on the "
            "connection's unique name",
            kBusName, err);
      } else {
        // RequestName replies 1 (primary owner) … 3 (exists) even without an error.
        std::uint32_t code = 0;
        if (sd_bus_message_read(m, "u", &code) < 0) code = 0;
        if (code == 1 || code == 4) {
          spdlog::info("D-Bus: serving {} at {}", kBusName, kObjectPath);
        } else {
          err = "name already owned (RequestName returned " + std::to_string(code) + ")";
          spdlog::warn("D-Bus: cannot own the name {}: {}", kBusName, err);
        }
      }
      if (self->handlers.name_result) self->handlers.name_result(err.empty(), err);
    } catch (const std::exception& ex) {
      spdlog::error("D-Bus: internal error in the name reply: {}", ex.what());
    } catch (...) {
      spdlog::error("D-Bus: internal error in the name reply");
    }
    return 0;
  }

  // A filter sees the local org.freedesktop.DBus.Local.Disconnected message without a match
  // round trip to the broker.
  static int on_message(sd_bus_message* m, void* userdata, sd_bus_error*) {
    auto* self = static_cast<Impl*>(userdata);
    try {
      if (sd_bus_message_is_signal(m, "org.freedesktop.DBus.Local", "Disconnected") > 0)
        self->disconnected();
    } catch (...) {
      // Logging itself failed; nothing sensible is left to do.
    }
    return 0;  // never consume: let sd-bus dispatch it normally
  }

  // A timer's work, `what` naming it in the log if it throws: nothing unwinds into sd-event.
  template <void (Impl::*Work)()>
  static int on_timer(sd_event_source*, std::uint64_t, void* userdata) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    const char* what = Work == &Impl::reconnect ? "reconnecting" : "emitting counters";
    try {
      (self->*Work)();
    } catch (const std::exception& e) {
      spdlog::error("D-Bus: internal error {}: {}", what, e.what());
    } catch (...) {
      spdlog::error("D-Bus: internal error {}", what);
    }
    return 0;
  }

  // Built from kProperties; systemd/io.tbagent.Agent1.xml is the contract, tests/unit/dbus
  // compares the two.
  static const sd_bus_vtable* vtable() {
    static const std::vector<sd_bus_vtable> table = [] {
      std::vector<sd_bus_vtable> t;
      t.push_back(SD_BUS_VTABLE_START(0));
      for (const Property& p : kProperties) {
        // Names and signatures are string literals (NUL-terminated), which sd-bus keeps.
        t.push_back(SD_BUS_PROPERTY(p.name.data(), signature(p.field).data(), &Impl::get_property,
                                    0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE));
      }
      t.push_back(SD_BUS_METHOD("Flush", "", "", &Impl::method_flush, 0));
      t.push_back(SD_BUS_METHOD("Reload", "", "", &Impl::method_reload, 0));
      t.push_back(SD_BUS_VTABLE_END);
      return t;
    }();
    return table.data();
  }
};

std::unique_ptr<StatusService> StatusService::create(sd_event* loop, config::BusKind kind,
                                                     std::function<Status()> snapshot,
                                                     Handlers handlers, std::string* error) {
  auto fail = [&](std::string what) -> std::unique_ptr<StatusService> {
    if (error) *error = std::move(what);
    return nullptr;
  };
  if (kind == config::BusKind::None) return fail("D-Bus is disabled (dbus.bus: none)");
  if (!loop || !snapshot) return fail("internal error: no event loop or snapshot function");

  auto impl = std::make_unique<Impl>();
  impl->loop = loop;
  impl->kind = kind;
  impl->snapshot = std::move(snapshot);
  impl->handlers = std::move(handlers);
  try {
    impl->refresh();
  } catch (const std::exception& e) {
    return fail(std::string("snapshot failed: ") + e.what());
  }

  int r = sd_event_add_time(loop, &impl->counter_timer, CLOCK_MONOTONIC, UINT64_MAX, 10'000,
                            &Impl::on_timer<&Impl::counters_due>, impl.get());
  if (r < 0) return fail("cannot create the counter timer: " + errno_text(r));
  sd_event_source_set_enabled(impl->counter_timer, SD_EVENT_OFF);
  sd_event_source_set_priority(impl->counter_timer, kBusPriority);
  r = sd_event_add_time(loop, &impl->reconnect_timer, CLOCK_MONOTONIC, UINT64_MAX, 100'000,
                        &Impl::on_timer<&Impl::reconnect>, impl.get());
  if (r < 0) return fail("cannot create the reconnect timer: " + errno_text(r));
  sd_event_source_set_enabled(impl->reconnect_timer, SD_EVENT_OFF);

  // A bus that is not there yet (dbus-daemon not started, or restarting) is not an error: the
  // service keeps trying, as after a lost connection.
  std::string err;
  if (!impl->connect(&err)) {
    spdlog::warn("D-Bus: {}; the agent runs without D-Bus status until it can connect", err);
    impl->last_connect_error = err;
    impl->schedule_reconnect();
  }
  return std::unique_ptr<StatusService>(new StatusService(std::move(impl)));
}

StatusService::StatusService(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

StatusService::~StatusService() = default;

void StatusService::changed() {
  try {
    impl_->changed();
  } catch (const std::exception& e) {
    spdlog::error("D-Bus: cannot publish the status: {}", e.what());
  } catch (...) {
    spdlog::error("D-Bus: cannot publish the status");
  }
}

bool StatusService::connected() const { return impl_->is_connected; }

}  // namespace tb::dbus
