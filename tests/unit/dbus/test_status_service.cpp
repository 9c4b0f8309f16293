// StatusService against a private dbus-daemon (tests/unit/dbus/private_bus.hpp): the vtable matches
// systemd/io.tbagent.Agent1.xml, properties follow snapshots, PropertiesChanged arrives (counters
// rate-limited), methods reach their handlers, and a lost bus does not stop the loop.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "dbus/status_service.hpp"
#include "private_bus.hpp"

namespace fs = std::filesystem;
using tb::dbus::Status;
using tb::dbus::StatusService;
using tb::test::PrivateBus;

namespace {

// ---- a tiny reader for introspection XML: enough to compare members and signatures ----

struct Prop {
  std::string type, access, emits = "true";  // EmitsChangedSignal defaults to true
  bool operator==(const Prop&) const = default;
};
struct Arg {
  std::string name, type, direction;
  bool operator==(const Arg&) const = default;
};
struct Iface {
  std::map<std::string, Prop> properties;
  std::map<std::string, std::vector<Arg>> methods;
  std::map<std::string, std::vector<Arg>> signals;
  bool found = false;
};

// name="value" pairs of one tag. Hand-written rather than std::regex: g++ 12 with
// -fsanitize=address reports a false -Wmaybe-uninitialized inside <regex>.
std::map<std::string, std::string> attributes(const std::string& tag) {
  std::map<std::string, std::string> out;
  std::size_t pos = tag.find_first_of(" \t\r\n");
  while (pos != std::string::npos) {
    const std::size_t eq = tag.find('=', pos);
    if (eq == std::string::npos) break;
    const std::size_t open = tag.find('"', eq);
    if (open == std::string::npos) break;
    const std::size_t close = tag.find('"', open + 1);
    if (close == std::string::npos) break;
    std::string name = tag.substr(pos, eq - pos);
    const auto first = name.find_first_not_of(" \t\r\n");
    const auto last = name.find_last_not_of(" \t\r\n");
    name = first == std::string::npos ? "" : name.substr(first, last - first + 1);
    out[name] = tag.substr(open + 1, close - open - 1);
    pos = close + 1;
  }
  return out;
}

Iface parse_interface(const std::string& xml, const std::string& name) {
  Iface out;
  bool inside = false;
  std::string member_kind, member;  // the property/method/signal the next children belong to
  std::size_t pos = 0;
  while ((pos = xml.find('<', pos)) != std::string::npos) {
    if (xml.compare(pos, 4, "<!--") == 0) {
      pos = xml.find("-->", pos);
      if (pos == std::string::npos) break;
      continue;
    }
    const std::size_t end = xml.find('>', pos);
    if (end == std::string::npos) break;
    std::string tag = xml.substr(pos + 1, end - pos - 1);
    pos = end + 1;
    if (tag.empty() || tag[0] == '!' || tag[0] == '?') continue;
    const bool closing = tag[0] == '/';
    const bool self_closing = tag.back() == '/';
    std::string tname = tag.substr(closing ? 1 : 0);
    tname = tname.substr(0, tname.find_first_of(" \t\r\n/"));
    auto attrs = attributes(tag);
    if (tname == "interface") {
      if (closing) {
        inside = false;
      } else if (attrs["name"] == name) {
        inside = !self_closing;
        out.found = true;
      }
      continue;
    }
    if (!inside) continue;
    if (closing) {
      if (tname == member_kind) member_kind.clear();
      continue;
    }
    if (tname == "property") {
      out.properties[attrs["name"]] = Prop{attrs["type"], attrs["access"]};
      member_kind = self_closing ? "" : "property";
      member = attrs["name"];
    } else if (tname == "method" || tname == "signal") {
      (tname == "method" ? out.methods : out.signals)[attrs["name"]];
      member_kind = self_closing ? "" : tname;
      member = attrs["name"];
    } else if (tname == "arg" && !member_kind.empty()) {
      // Method args default to "in", signal args are always "out" (D-Bus spec).
      std::string dir = attrs["direction"];
      if (dir.empty()) dir = member_kind == "method" ? "in" : "out";
      auto& args = (member_kind == "method" ? out.methods : out.signals)[member];
      args.push_back({attrs["name"], attrs["type"], dir});
    } else if (tname == "annotation" && member_kind == "property" &&
               attrs["name"] == "org.freedesktop.DBus.Property.EmitsChangedSignal") {
      out.properties[member].emits = attrs["value"];
    }
  }
  return out;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// ---- the test fixture: one loop, the service and a client connection on it ----

class StatusServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(daemon_.address().empty()) << "dbus-daemon did not start";
    // Without the guid= that daemon_.address() carries: a restarted broker has a new one, and
    // sd-bus refuses a server whose guid differs from the address's (the system bus address has
    // none either).
    setenv("DBUS_SESSION_BUS_ADDRESS", daemon_.socket_address().c_str(), 1);
    ASSERT_GE(sd_event_new(&loop_), 0);
    connect_client();
  }
  void connect_client() {
    ASSERT_GE(sd_bus_new(&client_), 0);
    ASSERT_GE(sd_bus_set_address(client_, daemon_.address().c_str()), 0);
    ASSERT_GE(sd_bus_set_bus_client(client_, 1), 0);
    ASSERT_GE(sd_bus_start(client_), 0);
    ASSERT_GE(sd_bus_attach_event(client_, loop_, 0), 0);
  }
  // After the broker restarted: the test's own connection is gone too.
  void reconnect_client() {
    client_ = sd_bus_close_unref(client_);
    connect_client();
  }
  void TearDown() override {
    service_.reset();
    sd_bus_flush_close_unref(client_);
    sd_event_unref(loop_);
  }

  void start_service() {
    tb::dbus::Handlers h;
    h.flush = [this] { ++flushes_; };
    h.reload = [this] {
      ++reloads_;
      return reload_result_;
    };
    h.name_result = [this](bool owned, const std::string& err) {
      owned_ = owned;
      name_error_ = err;
      name_answered_ = true;
    };
    std::string err;
    service_ = StatusService::create(
        loop_, tb::config::BusKind::Session,
        [this] {
          if (snapshot_throws_) throw std::runtime_error("snapshot failed");
          return status_;
        },
        std::move(h), &err);
    ASSERT_TRUE(service_) << err;
    ASSERT_TRUE(spin_until([this] { return name_answered_; }));
    ASSERT_TRUE(owned_) << name_error_;
  }

  bool spin_until(const std::function<bool()>& done,
                  std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!done()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      if (sd_event_run(loop_, 20'000) < 0) return false;
    }
    return true;
  }
  void spin_for(std::chrono::milliseconds d) {
    spin_until([] { return false; }, d);
  }

  // A method call to the service, answered while the loop turns. Returns the reply (owned).
  sd_bus_message* call(const char* iface, const char* member, const char* sig = nullptr,
                       const char* arg1 = nullptr, const char* arg2 = nullptr) {
    sd_bus_message* m = nullptr;
    sd_bus_message_new_method_call(client_, &m, tb::dbus::kBusName, tb::dbus::kObjectPath, iface,
                                   member);
    if (sig && arg2)
      sd_bus_message_append(m, sig, arg1, arg2);
    else if (sig)
      sd_bus_message_append(m, sig, arg1);
    sd_bus_message* reply = nullptr;
    auto cb = [](sd_bus_message* r, void* ud, sd_bus_error*) -> int {
      *static_cast<sd_bus_message**>(ud) = sd_bus_message_ref(r);
      return 0;
    };
    sd_bus_call_async(client_, nullptr, m, cb, &reply, 0);
    sd_bus_message_unref(m);
    spin_until([&] { return reply != nullptr; });
    return reply;
  }

  sd_bus_message* get(const char* property) {
    sd_bus_message* r =
        call("org.freedesktop.DBus.Properties", "Get", "ss", tb::dbus::kInterface, property);
    EXPECT_TRUE(r);
    if (r) {
      EXPECT_FALSE(sd_bus_message_is_method_error(r, nullptr)) << property;
    }
    if (r) sd_bus_message_enter_container(r, 'v', nullptr);
    return r;
  }
  std::string get_s(const char* property) {
    sd_bus_message* r = get(property);
    const char* s = nullptr;
    if (r) sd_bus_message_read(r, "s", &s);
    std::string out = s ? s : "<none>";
    sd_bus_message_unref(r);
    return out;
  }
  std::uint64_t get_t(const char* property) {
    sd_bus_message* r = get(property);
    std::uint64_t t = ~0ull;
    if (r) sd_bus_message_read(r, "t", &t);
    sd_bus_message_unref(r);
    return t;
  }

  struct Change {
    std::chrono::steady_clock::time_point at;
    std::map<std::string, std::string> values;  // property → value as text
  };
  void watch_changes() {
    auto cb = [](sd_bus_message* m, void* ud, sd_bus_error*) -> int {
      auto* self = static_cast<StatusServiceTest*>(ud);
      const char* iface = nullptr;
      if (sd_bus_message_read(m, "s", &iface) < 0 || std::string(iface) != tb::dbus::kInterface)
        return 0;
      Change c{std::chrono::steady_clock::now(), {}};
      sd_bus_message_enter_container(m, 'a', "{sv}");
      while (sd_bus_message_enter_container(m, 'e', "sv") > 0) {
        const char* name = nullptr;
        sd_bus_message_read(m, "s", &name);
        const char* contents = nullptr;
        sd_bus_message_peek_type(m, nullptr, &contents);
        sd_bus_message_enter_container(m, 'v', contents);
        std::string v;
        if (std::string(contents) == "s") {
          const char* s = nullptr;
          sd_bus_message_read(m, "s", &s);
          v = s;
        } else if (std::string(contents) == "t") {
          std::uint64_t t = 0;
          sd_bus_message_read(m, "t", &t);
          v = std::to_string(t);
        } else if (std::string(contents) == "b") {
          int b = 0;
          sd_bus_message_read(m, "b", &b);
          v = b ? "true" : "false";
        } else {
          v = contents;
          sd_bus_message_skip(m, contents);
        }
        sd_bus_message_exit_container(m);
        sd_bus_message_exit_container(m);
        c.values[name] = v;
      }
      self->changes_.push_back(std::move(c));
      return 0;
    };
    ASSERT_GE(sd_bus_match_signal(client_, nullptr, nullptr, tb::dbus::kObjectPath,
                                  "org.freedesktop.DBus.Properties", "PropertiesChanged", cb, this),
              0);
  }

  PrivateBus daemon_;
  sd_event* loop_ = nullptr;
  sd_bus* client_ = nullptr;
  Status status_ = [] {
    Status s;
    s.state = "running";
    s.device_name = "pump-7";
    s.provisioned = true;
    s.server = "tb.example.com:5683";
    s.queued_readings = 12;
    s.sent_readings = 34;
    s.dropped_readings = 5;
    s.last_success_time = 1'700'000'000'000'000;
    s.last_error = "";
    s.sources = {{"room", "file", 30'000'000, 7, 1, 1'700'000'000'000'000, "ENOENT"},
                 {"sensors", "exec", 60'000'000, 2, 0, 0, ""}};
    s.status_text = "delivering 12 queued reading(s)";
    s.attributes_observation = "observing";
    s.last_rpc = "getStatus (id 0): ok";
    return s;
  }();
  std::unique_ptr<StatusService> service_;
  int flushes_ = 0, reloads_ = 0;
  std::string reload_result_;
  bool name_answered_ = false, owned_ = false, snapshot_throws_ = false;
  std::string name_error_;
  std::vector<Change> changes_;
};

TEST_F(StatusServiceTest, IntrospectionMatchesTheXmlContract) {
  start_service();
  sd_bus_message* r = call("org.freedesktop.DBus.Introspectable", "Introspect");
  ASSERT_TRUE(r);
  ASSERT_FALSE(sd_bus_message_is_method_error(r, nullptr));
  const char* xml = nullptr;
  ASSERT_GE(sd_bus_message_read(r, "s", &xml), 0);
  const Iface live = parse_interface(xml, tb::dbus::kInterface);
  sd_bus_message_unref(r);

  const fs::path contract = fs::path(TB_SOURCE_DIR) / "systemd/io.tbagent.Agent1.xml";
  const Iface want = parse_interface(read_file(contract), tb::dbus::kInterface);
  ASSERT_TRUE(want.found) << contract;
  ASSERT_TRUE(live.found);
  EXPECT_FALSE(want.properties.empty());

  for (const auto& [name, p] : want.properties) {
    auto it = live.properties.find(name);
    ASSERT_NE(it, live.properties.end()) << "missing property " << name;
    EXPECT_EQ(it->second.type, p.type) << name;
    EXPECT_EQ(it->second.access, p.access) << name;
    EXPECT_EQ(it->second.emits, p.emits) << name;
  }
  for (const auto& [name, p] : live.properties)
    EXPECT_TRUE(want.properties.count(name)) << "property not in the XML: " << name;
  EXPECT_EQ(live.methods, want.methods);
  EXPECT_EQ(live.signals, want.signals);
  // The docs/interface.md names, independently of both files.
  for (const char* p : {"State", "DeviceName", "Provisioned", "Server", "QueuedReadings",
                        "SentReadings", "DroppedReadings", "LastSuccessTime", "LastError"})
    EXPECT_TRUE(want.properties.count(p)) << p;
  EXPECT_TRUE(want.methods.count("Flush"));
  EXPECT_TRUE(want.methods.count("Reload"));
}

TEST_F(StatusServiceTest, PropertiesFollowTheSnapshot) {
  start_service();
  EXPECT_EQ(get_s("State"), "running");
  EXPECT_EQ(get_s("DeviceName"), "pump-7");
  EXPECT_EQ(get_s("Server"), "tb.example.com:5683");
  EXPECT_EQ(get_s("LastError"), "");
  EXPECT_EQ(get_s("StatusText"), "delivering 12 queued reading(s)");
  EXPECT_EQ(get_t("QueuedReadings"), 12u);
  EXPECT_EQ(get_t("SentReadings"), 34u);
  EXPECT_EQ(get_t("DroppedReadings"), 5u);
  EXPECT_EQ(get_t("LastSuccessTime"), 1'700'000'000'000'000u);
  EXPECT_EQ(get_s("AttributesObservation"), "observing");
  EXPECT_EQ(get_s("RpcObservation"), "");
  EXPECT_EQ(get_s("LastRpc"), "getStatus (id 0): ok");
  EXPECT_EQ(get_s("LastRemoteChange"), "");
  {
    sd_bus_message* r = get("Provisioned");
    int b = 0;
    ASSERT_GE(sd_bus_message_read(r, "b", &b), 0);
    EXPECT_TRUE(b);
    sd_bus_message_unref(r);
  }
  {
    sd_bus_message* r = get("Sources");
    ASSERT_GE(sd_bus_message_enter_container(r, 'a', "(sstttts)"), 0);
    std::vector<tb::dbus::SourceRow> rows;
    const char *n, *t, *e;
    std::uint64_t iv, rd, er, last;
    while (sd_bus_message_read(r, "(sstttts)", &n, &t, &iv, &rd, &er, &last, &e) > 0)
      rows.push_back({n, t, iv, rd, er, last, e});
    EXPECT_EQ(rows, status_.sources);
    sd_bus_message_unref(r);
  }

  // Getters serve the current state even before changed() is called.
  status_.state = "retrying";
  status_.last_error = "server answered 5.00";
  status_.queued_readings = 99;
  EXPECT_EQ(get_s("State"), "retrying");
  EXPECT_EQ(get_s("LastError"), "server answered 5.00");
  EXPECT_EQ(get_t("QueuedReadings"), 99u);

  // GetAll returns every property.
  sd_bus_message* r = call("org.freedesktop.DBus.Properties", "GetAll", "s", tb::dbus::kInterface);
  ASSERT_TRUE(r);
  ASSERT_FALSE(sd_bus_message_is_method_error(r, nullptr));
  ASSERT_GE(sd_bus_message_enter_container(r, 'a', "{sv}"), 0);
  int count = 0;
  while (sd_bus_message_enter_container(r, 'e', "sv") > 0) {
    ++count;
    sd_bus_message_skip(r, "sv");
    sd_bus_message_exit_container(r);
  }
  EXPECT_EQ(count, static_cast<int>(tb::dbus::kProperties.size()));
  EXPECT_EQ(count, 15);
  sd_bus_message_unref(r);
}

TEST_F(StatusServiceTest, PropertiesChangedArrivesForState) {
  start_service();
  watch_changes();
  service_->changed();  // nothing changed: nothing is sent
  status_.state = "unauthorized";
  status_.last_error = "server answered 4.01";
  service_->changed();
  ASSERT_TRUE(spin_until([this] { return !changes_.empty(); }));
  spin_for(std::chrono::milliseconds(200));
  ASSERT_EQ(changes_.size(), 1u);
  EXPECT_EQ(changes_[0].values.at("State"), "unauthorized");
  EXPECT_EQ(changes_[0].values.at("LastError"), "server answered 4.01");
  EXPECT_EQ(changes_[0].values.size(), 2u);

  status_.provisioned = false;
  status_.device_name = "pump-8";
  service_->changed();
  ASSERT_TRUE(spin_until([this] { return changes_.size() == 2; }));
  EXPECT_EQ(changes_[1].values.at("Provisioned"), "false");
  EXPECT_EQ(changes_[1].values.at("DeviceName"), "pump-8");
}

TEST_F(StatusServiceTest, CountersAreRateLimitedButTheLatestValueArrives) {
  start_service();
  watch_changes();
  status_.sent_readings = 100;
  service_->changed();
  ASSERT_TRUE(spin_until([this] { return !changes_.empty(); }));
  EXPECT_EQ(changes_[0].values.at("SentReadings"), "100");
  const auto first = changes_[0].at;

  // Two more changes within 100 ms: no signal now, the latest one when the second is up.
  status_.sent_readings = 101;
  service_->changed();
  spin_for(std::chrono::milliseconds(50));
  status_.sent_readings = 102;
  status_.queued_readings = 3;
  service_->changed();
  spin_for(std::chrono::milliseconds(300));
  EXPECT_EQ(changes_.size(), 1u);
  ASSERT_TRUE(spin_until([this] { return changes_.size() >= 2; }, std::chrono::milliseconds(2000)));
  spin_for(std::chrono::milliseconds(200));
  ASSERT_EQ(changes_.size(), 2u);
  EXPECT_EQ(changes_[1].values.at("SentReadings"), "102");
  EXPECT_EQ(changes_[1].values.at("QueuedReadings"), "3");
  const auto gap = changes_[1].at - first;
  EXPECT_GE(gap, std::chrono::milliseconds(900));
  EXPECT_LE(gap, std::chrono::milliseconds(1600));

  // A state change is never held back by the counter limit.
  status_.state = "stopping";
  status_.sent_readings = 103;
  service_->changed();
  ASSERT_TRUE(spin_until([this] { return changes_.size() >= 3; }, std::chrono::milliseconds(300)));
  EXPECT_EQ(changes_[2].values.at("State"), "stopping");
  EXPECT_EQ(changes_[2].values.count("SentReadings"), 0u);
  ASSERT_TRUE(spin_until([this] { return changes_.size() >= 4; }, std::chrono::milliseconds(2000)));
  EXPECT_EQ(changes_[3].values.at("SentReadings"), "103");
}

TEST_F(StatusServiceTest, FlushAndReloadReachTheirHandlers) {
  start_service();
  sd_bus_message* r = call(tb::dbus::kInterface, "Flush");
  ASSERT_TRUE(r);
  EXPECT_FALSE(sd_bus_message_is_method_error(r, nullptr));
  sd_bus_message_unref(r);
  EXPECT_EQ(flushes_, 1);

  r = call(tb::dbus::kInterface, "Reload");
  ASSERT_TRUE(r);
  EXPECT_FALSE(sd_bus_message_is_method_error(r, nullptr));
  sd_bus_message_unref(r);
  EXPECT_EQ(reloads_, 1);

  reload_result_ = "/etc/tb-agent.yaml:3:9: unknown key 'hots'";
  r = call(tb::dbus::kInterface, "Reload");
  ASSERT_TRUE(r);
  ASSERT_TRUE(sd_bus_message_is_method_error(r, tb::dbus::kErrorInvalidConfig));
  const sd_bus_error* e = sd_bus_message_get_error(r);
  ASSERT_TRUE(e);
  EXPECT_STREQ(e->name, "io.tbagent.Agent1.Error.InvalidConfig");
  EXPECT_STREQ(e->message, "/etc/tb-agent.yaml:3:9: unknown key 'hots'");
  sd_bus_message_unref(r);
  EXPECT_EQ(reloads_, 2);
}

// Issue 8 #6: a string that is not UTF-8 (a device name from an old credentials.json, a source
// error quoting a file, half a character cut off a reload message) made sd-bus refuse GetAll,
// every PropertiesChanged and the Reload reply. Such bytes now arrive as U+FFFD.
TEST_F(StatusServiceTest, InvalidUtf8NeverBreaksTheBus) {
  const std::string kBad = "pump-\xE9";            // Latin-1 'é'
  const std::string kShown = "pump-\xEF\xBF\xBD";  // U+FFFD in its place
  status_.device_name = kBad;
  status_.sources[0].last_error = "cannot parse '\xFF\xFE'";
  start_service();
  watch_changes();

  EXPECT_EQ(get_s("DeviceName"), kShown);
  sd_bus_message* r = call("org.freedesktop.DBus.Properties", "GetAll", "s", tb::dbus::kInterface);
  ASSERT_TRUE(r);
  ASSERT_FALSE(sd_bus_message_is_method_error(r, nullptr)) << sd_bus_message_get_error(r)->message;
  sd_bus_message_unref(r);

  // A refused reload's message cut in the middle of 'é'.
  status_.state = "failed";
  status_.last_error = "reload refused: not 'a\xC3";
  service_->changed();
  ASSERT_TRUE(spin_until([this] { return !changes_.empty(); }));
  EXPECT_EQ(changes_[0].values.at("State"), "failed");
  EXPECT_EQ(changes_[0].values.at("LastError"), "reload refused: not 'a\xEF\xBF\xBD");
  EXPECT_EQ(get_s("LastError"), "reload refused: not 'a\xEF\xBF\xBD");

  // Reload callers get their (error) reply.
  reload_result_ = "/etc/tb-agent.yaml:3:9: not 'a\xC3...'";
  r = call(tb::dbus::kInterface, "Reload");
  ASSERT_TRUE(r);
  ASSERT_TRUE(sd_bus_message_is_method_error(r, tb::dbus::kErrorInvalidConfig));
  EXPECT_STREQ(sd_bus_message_get_error(r)->message,
               "/etc/tb-agent.yaml:3:9: not 'a\xEF\xBF\xBD...'");
  sd_bus_message_unref(r);
  EXPECT_TRUE(service_->connected());
}

TEST_F(StatusServiceTest, HandlerExceptionsBecomeErrorReplies) {
  tb::dbus::Handlers h;
  h.flush = [] { throw std::runtime_error("boom"); };
  bool answered = false;
  h.name_result = [&](bool, const std::string&) { answered = true; };
  std::string err;
  service_ = StatusService::create(
      loop_, tb::config::BusKind::Session, [this] { return status_; }, std::move(h), &err);
  ASSERT_TRUE(service_) << err;
  ASSERT_TRUE(spin_until([&] { return answered; }));
  sd_bus_message* r = call(tb::dbus::kInterface, "Flush");
  ASSERT_TRUE(r);
  EXPECT_TRUE(sd_bus_message_is_method_error(r, tb::dbus::kErrorFailed));
  sd_bus_message_unref(r);
}

TEST_F(StatusServiceTest, ThrowingSnapshotNeverUnwindsIntoTheLoop) {
  start_service();
  snapshot_throws_ = true;
  EXPECT_NO_THROW(service_->changed());
  // A getter's failure becomes an error reply; the loop and the connection go on.
  sd_bus_message* r =
      call("org.freedesktop.DBus.Properties", "Get", "ss", tb::dbus::kInterface, "State");
  ASSERT_TRUE(r);
  EXPECT_TRUE(sd_bus_message_is_method_error(r, nullptr));
  sd_bus_message_unref(r);
  snapshot_throws_ = false;
  EXPECT_EQ(get_s("State"), "running");
  EXPECT_TRUE(service_->connected());
}

TEST_F(StatusServiceTest, SecondOwnerIsToldTheNameIsTaken) {
  start_service();
  bool answered = false, owned = true;
  tb::dbus::Handlers h;
  h.name_result = [&](bool o, const std::string&) {
    answered = true;
    owned = o;
  };
  std::string err;
  auto second = StatusService::create(
      loop_, tb::config::BusKind::Session, [this] { return status_; }, std::move(h), &err);
  ASSERT_TRUE(second) << err;
  ASSERT_TRUE(spin_until([&] { return answered; }));
  EXPECT_FALSE(owned);
}

TEST_F(StatusServiceTest, LosingTheBusKeepsTheLoopRunning) {
  start_service();
  EXPECT_TRUE(service_->connected());
  daemon_.stop();
  ASSERT_TRUE(spin_until([this] { return !service_->connected(); }));
  // The loop still turns and changed() is harmless.
  status_.state = "retrying";
  status_.sent_readings = 1;
  service_->changed();
  service_->changed();
  int ticks = 0;
  sd_event_source* t = nullptr;
  ASSERT_GE(sd_event_add_time_relative(
                loop_, &t, CLOCK_MONOTONIC, 10'000, 0,
                [](sd_event_source*, std::uint64_t, void* ud) -> int {
                  ++*static_cast<int*>(ud);
                  return 0;
                },
                &ticks),
            0);
  EXPECT_TRUE(spin_until([&] { return ticks == 1; }));
  sd_event_source_unref(t);
}

TEST_F(StatusServiceTest, ReconnectsWhenTheBusComesBack) {
  start_service();
  daemon_.stop();
  ASSERT_TRUE(spin_until([this] { return !service_->connected(); }));
  status_.state = "retrying";  // changes while nobody can hear of them
  status_.sent_readings = 42;
  service_->changed();
  name_answered_ = false;
  daemon_.start();  // same address, a new broker: every connection has to be made again
  reconnect_client();
  // The first attempt comes within 1 s, the next within 2 s more (full jitter).
  ASSERT_TRUE(spin_until([this] { return service_->connected() && name_answered_; },
                         std::chrono::milliseconds(10'000)));
  EXPECT_TRUE(owned_) << name_error_;
  EXPECT_EQ(get_s("State"), "retrying");
  EXPECT_EQ(get_t("SentReadings"), 42u);
  // And it publishes changes on the new connection.
  watch_changes();
  status_.state = "running";
  service_->changed();
  ASSERT_TRUE(spin_until([this] { return !changes_.empty(); }));
  EXPECT_EQ(get_s("State"), "running");
}

TEST(StatusServiceCreate, ConnectsWhenTheBusAppearsLater) {
  PrivateBus later(/*start_now=*/false);
  const char* old = getenv("DBUS_SESSION_BUS_ADDRESS");
  const std::string saved = old ? old : "";
  setenv("DBUS_SESSION_BUS_ADDRESS", later.socket_address().c_str(), 1);
  sd_event* loop = nullptr;
  ASSERT_GE(sd_event_new(&loop), 0);
  bool owned = false;
  tb::dbus::Handlers h;
  h.name_result = [&](bool o, const std::string&) { owned = o; };
  std::string err;
  Status st;
  st.state = "running";
  auto s = StatusService::create(
      loop, tb::config::BusKind::Session, [&] { return st; }, std::move(h), &err);
  ASSERT_TRUE(s) << err;
  EXPECT_FALSE(s->connected());
  later.start();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!(s->connected() && owned) && std::chrono::steady_clock::now() < deadline)
    ASSERT_GE(sd_event_run(loop, 20'000), 0);
  EXPECT_TRUE(s->connected());
  EXPECT_TRUE(owned);
  s.reset();
  sd_event_unref(loop);
  if (old)
    setenv("DBUS_SESSION_BUS_ADDRESS", saved.c_str(), 1);
  else
    unsetenv("DBUS_SESSION_BUS_ADDRESS");
}

TEST(StatusServiceCreate, BusKindNoneIsRefused) {
  sd_event* loop = nullptr;
  ASSERT_GE(sd_event_new(&loop), 0);
  std::string err;
  auto s = StatusService::create(
      loop, tb::config::BusKind::None, [] { return Status{}; }, {}, &err);
  EXPECT_FALSE(s);
  EXPECT_FALSE(err.empty());
  sd_event_unref(loop);
}

TEST(StatusServiceCreate, NoBusIsNotFatal) {
  sd_event* loop = nullptr;
  ASSERT_GE(sd_event_new(&loop), 0);
  const char* old = getenv("DBUS_SESSION_BUS_ADDRESS");
  const std::string saved = old ? old : "";
  setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/tb-agent-test/bus", 1);
  std::string err;
  auto s = StatusService::create(
      loop, tb::config::BusKind::Session, [] { return Status{}; }, {}, &err);
  ASSERT_TRUE(s) << err;
  EXPECT_FALSE(s->connected());
  s->changed();  // harmless without a connection
  // The loop turns through a reconnect attempt (the first comes within 1 s) without trouble.
  for (int i = 0; i < 60; ++i) ASSERT_GE(sd_event_run(loop, 20'000), 0);
  EXPECT_FALSE(s->connected());
  s.reset();
  if (old)
    setenv("DBUS_SESSION_BUS_ADDRESS", saved.c_str(), 1);
  else
    unsetenv("DBUS_SESSION_BUS_ADDRESS");
  sd_event_unref(loop);
}

TEST(IntrospectionXml, ParserReadsArgsAndAnnotations) {
  const Iface i = parse_interface(R"(<node><interface name="x.Y">
      <!-- <property name="Commented" type="s" access="read"/> -->
      <method name="M"><arg name="a" type="s" direction="in"/><arg type="u" direction="out"/></method>
      <property name="P" type="t" access="read">
        <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="false"/>
      </property>
      <signal name="S"><arg name="v" type="b"/></signal>
    </interface><interface name="other"><method name="N"/></interface></node>)",
                                  "x.Y");
  ASSERT_TRUE(i.found);
  EXPECT_EQ(i.properties.size(), 1u);
  EXPECT_EQ(i.properties.at("P"), (Prop{"t", "read", "false"}));
  ASSERT_EQ(i.methods.size(), 1u);
  EXPECT_EQ(i.methods.at("M"), (std::vector<Arg>{{"a", "s", "in"}, {"", "u", "out"}}));
  EXPECT_EQ(i.signals.at("S"), (std::vector<Arg>{{"v", "b", "out"}}));
}

}  // namespace
