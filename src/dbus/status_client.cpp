#include "dbus/status_client.hpp"

#include <systemd/sd-bus.h>

#include <cerrno>
#include <cstring>
#include <string_view>
#include <variant>
#include <vector>

namespace tb::dbus {

namespace {

// Owns one connection and the messages and error of one call.
struct Call {
  sd_bus* bus = nullptr;
  sd_bus_message* reply = nullptr;
  sd_bus_error error = SD_BUS_ERROR_NULL;
  ~Call() {
    sd_bus_error_free(&error);
    sd_bus_message_unref(reply);
    sd_bus_flush_close_unref(bus);
  }
};

const char* bus_name(config::BusKind kind) {
  return kind == config::BusKind::Session ? "session" : "system";
}

// Opens the bus the agent serves on. DBUS_SYSTEM_BUS_ADDRESS / DBUS_SESSION_BUS_ADDRESS are
// honoured by sd_bus_open_system / sd_bus_open_user.
CallResult open(config::BusKind kind, Call* c, std::string* error) {
  if (kind == config::BusKind::None) {
    *error = "D-Bus is disabled (dbus.bus: none): the agent publishes no status";
    return CallResult::NoAgent;
  }
  const int r =
      kind == config::BusKind::System ? sd_bus_open_system(&c->bus) : sd_bus_open_user(&c->bus);
  if (r < 0) {
    c->bus = nullptr;
    *error = std::string("cannot connect to the ") + bus_name(kind) + " bus: " + std::strerror(-r);
    return CallResult::NoAgent;
  }
  return CallResult::Ok;
}

CallResult classify_error(config::BusKind kind, const sd_bus_error& e, int r, std::string* error) {
  const std::string_view name = e.name ? e.name : "";
  const std::string message = e.message ? e.message : std::strerror(r < 0 ? -r : r);
  if (name == SD_BUS_ERROR_SERVICE_UNKNOWN || name == SD_BUS_ERROR_NAME_HAS_NO_OWNER ||
      name == SD_BUS_ERROR_UNKNOWN_OBJECT) {
    *error = std::string("no tb-agent is running on the ") + bus_name(kind) + " bus (nobody owns " +
             kBusName + ")";
    return CallResult::NoAgent;
  }
  // The connection itself failed (the broker went away between open and call).
  if (name.empty() && (r == -ENOENT || r == -ECONNREFUSED || r == -ENOTCONN || r == -ECONNRESET)) {
    *error = std::string("cannot talk to the ") + bus_name(kind) + " bus: " + message;
    return CallResult::NoAgent;
  }
  if (name == kErrorInvalidConfig) {
    *error = message;
    return CallResult::Refused;
  }
  if (name == SD_BUS_ERROR_NO_REPLY || r == -ETIMEDOUT) {
    *error = "the agent did not answer in time";
    return CallResult::Failed;
  }
  *error = name.empty() ? message : std::string(name) + ": " + message;
  return CallResult::Failed;
}

std::uint64_t usec(std::chrono::milliseconds d) {
  return static_cast<std::uint64_t>(d.count()) * 1000;
}

int read_sources(sd_bus_message* m, std::vector<SourceRow>* out) {
  const char* contents = nullptr;
  int r = sd_bus_message_peek_type(m, nullptr, &contents);
  if (r < 0) return r;
  // Only the signature this client knows; an agent with another one is read without sources.
  if (!contents || std::string_view(contents) != "a(sstttts)") return sd_bus_message_skip(m, "v");
  if ((r = sd_bus_message_enter_container(m, 'v', contents)) < 0) return r;
  if ((r = sd_bus_message_enter_container(m, 'a', "(sstttts)")) < 0) return r;
  const char *n = nullptr, *t = nullptr, *e = nullptr;
  SourceRow row;
  while ((r = sd_bus_message_read(m, "(sstttts)", &n, &t, &row.interval_usec, &row.readings,
                                  &row.errors, &row.last_reading_time, &e)) > 0) {
    row.name = n;
    row.type = t;
    row.last_error = e;
    out->push_back(row);
  }
  if (r < 0) return r;
  if ((r = sd_bus_message_exit_container(m)) < 0) return r;
  return sd_bus_message_exit_container(m);
}

// Reads one property's variant into `out` (dbus/status.hpp's kProperties says where); skips what
// it does not know, and a value of another type than this client expects.
int read_property(sd_bus_message* m, std::string_view name, Status* out) {
  struct Read {
    sd_bus_message* m;
    Status* out;
    bool type_is(const char* sig) const {
      const char* contents = nullptr;
      return sd_bus_message_peek_type(m, nullptr, &contents) >= 0 && contents &&
             std::string_view(contents) == sig;
    }
    int operator()(std::string Status::*f) const {
      if (!type_is("s")) return sd_bus_message_skip(m, "v");
      const char* s = nullptr;
      const int r = sd_bus_message_read(m, "v", "s", &s);
      if (r >= 0 && s) out->*f = s;
      return r;
    }
    int operator()(bool Status::*f) const {
      if (!type_is("b")) return sd_bus_message_skip(m, "v");
      int b = 0;
      const int r = sd_bus_message_read(m, "v", "b", &b);
      out->*f = b != 0;
      return r;
    }
    int operator()(std::uint64_t Status::*f) const {
      if (!type_is("t")) return sd_bus_message_skip(m, "v");
      return sd_bus_message_read(m, "v", "t", &(out->*f));
    }
    int operator()(std::vector<SourceRow> Status::*f) const { return read_sources(m, &(out->*f)); }
  };
  for (const Property& p : kProperties) {
    if (p.name == name) return std::visit(Read{m, out}, p.field);
  }
  return sd_bus_message_skip(m, "v");
}

}  // namespace

CallResult read_status(config::BusKind kind, Status* out, std::string* error,
                       std::chrono::milliseconds timeout) {
  Call c;
  if (const auto res = open(kind, &c, error); res != CallResult::Ok) return res;
  sd_bus_message* m = nullptr;
  int r = sd_bus_message_new_method_call(c.bus, &m, kBusName, kObjectPath,
                                         "org.freedesktop.DBus.Properties", "GetAll");
  if (r >= 0) r = sd_bus_message_append(m, "s", kInterface);
  if (r >= 0) r = sd_bus_call(c.bus, m, usec(timeout), &c.error, &c.reply);
  sd_bus_message_unref(m);
  if (r < 0) return classify_error(kind, c.error, r, error);

  Status s;
  s.state.clear();
  r = sd_bus_message_enter_container(c.reply, 'a', "{sv}");
  while (r >= 0 && (r = sd_bus_message_enter_container(c.reply, 'e', "sv")) > 0) {
    const char* name = nullptr;
    if ((r = sd_bus_message_read(c.reply, "s", &name)) < 0) break;
    if ((r = read_property(c.reply, name, &s)) < 0) break;
    r = sd_bus_message_exit_container(c.reply);
  }
  if (r < 0) {
    *error = std::string("cannot read the agent's answer: ") + std::strerror(-r);
    return CallResult::Failed;
  }
  *out = std::move(s);
  return CallResult::Ok;
}

CallResult call_reload(config::BusKind kind, std::string* error,
                       std::chrono::milliseconds timeout) {
  Call c;
  if (const auto res = open(kind, &c, error); res != CallResult::Ok) return res;
  sd_bus_message* m = nullptr;
  int r = sd_bus_message_new_method_call(c.bus, &m, kBusName, kObjectPath, kInterface, "Reload");
  if (r >= 0) r = sd_bus_call(c.bus, m, usec(timeout), &c.error, &c.reply);
  sd_bus_message_unref(m);
  if (r < 0) return classify_error(kind, c.error, r, error);
  return CallResult::Ok;
}

}  // namespace tb::dbus
