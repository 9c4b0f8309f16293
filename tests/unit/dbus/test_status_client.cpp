// The client side of `tb-agent status` / `tb-agent reload`: dbus::read_status and
// dbus::call_reload against the real StatusService on a private dbus-daemon (served from a
// thread with its own loop, since the client blocks), and the summary and JSON printed from
// what was read.
#include <gtest/gtest.h>
#include <systemd/sd-event.h>

#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>

#include "daemon/status_report.hpp"
#include "dbus/status_client.hpp"
#include "dbus/status_service.hpp"
#include "private_bus.hpp"

using tb::dbus::CallResult;
using tb::dbus::Status;
using tb::test::PrivateBus;

namespace {

constexpr std::uint64_t kNow = 1'700'000'100'000'000;  // µs since the epoch

Status sample() {
  Status s;
  s.state = "retrying";
  s.status_text = "retrying in 4s: server answered 5.00; 12 reading(s) queued";
  s.device_name = "pump-7";
  s.provisioned = true;
  s.server = "tb.example.com:5683";
  s.queued_readings = 12;
  s.sent_readings = 34;
  s.dropped_readings = 5;
  s.last_success_time = kNow - 12'000'000;  // 12 s before kNow
  s.last_error = "server answered 5.00";
  s.sources = {{"room", "file", 30'000'000, 7, 1, kNow - 3'000'000, "cannot read /x: ENOENT"},
               {"sensors", "exec", 60'000'000, 0, 0, 0, ""}};
  s.attributes_observation = "observing";
  s.rpc_observation = "retrying in 4s: no answer";
  s.last_rpc = "restart_modem (id 3): ok";
  s.last_remote_change = "applied host_interval=\"10s\"";
  return s;
}

// The real service, on its own thread and loop, publishing `status`.
class ServedAgent {
 public:
  explicit ServedAgent(Status status, std::string reload_answer = "")
      : status_(std::move(status)), reload_answer_(std::move(reload_answer)) {
    thread_ = std::thread([this] { run(); });
    while (!ready_ && !failed_) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ~ServedAgent() {
    stop_ = true;
    thread_.join();
  }
  bool ok() const { return ready_; }
  int reloads() const { return reloads_; }

 private:
  void run() {
    sd_event* loop = nullptr;
    if (sd_event_new(&loop) < 0) {
      failed_ = true;
      return;
    }
    tb::dbus::Handlers h;
    h.reload = [this] {
      ++reloads_;
      return reload_answer_;
    };
    h.name_result = [this](bool owned, const std::string&) {
      if (owned)
        ready_ = true;
      else
        failed_ = true;
    };
    std::string err;
    auto service = tb::dbus::StatusService::create(
        loop, tb::config::BusKind::Session, [this] { return status_; }, std::move(h), &err);
    if (!service) failed_ = true;
    while (!stop_ && service) sd_event_run(loop, 20'000);
    service.reset();
    sd_event_unref(loop);
  }
  Status status_;
  std::string reload_answer_;
  std::thread thread_;
  std::atomic<bool> ready_{false}, failed_{false}, stop_{false};
  std::atomic<int> reloads_{0};
};

class StatusClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(bus_.address().empty()) << "dbus-daemon did not start";
    setenv("DBUS_SESSION_BUS_ADDRESS", bus_.socket_address().c_str(), 1);
  }
  PrivateBus bus_;
};

TEST_F(StatusClientTest, ReadsEveryPropertyTheServicePublishes) {
  const Status want = sample();
  ServedAgent agent(want);
  ASSERT_TRUE(agent.ok());
  Status got;
  std::string err;
  ASSERT_EQ(tb::dbus::read_status(tb::config::BusKind::Session, &got, &err), CallResult::Ok) << err;
  EXPECT_EQ(got, want);
}

TEST_F(StatusClientTest, NoAgentOnTheBusIsNoAgent) {
  Status got;
  std::string err;
  EXPECT_EQ(tb::dbus::read_status(tb::config::BusKind::Session, &got, &err), CallResult::NoAgent);
  EXPECT_NE(err.find("no tb-agent is running"), std::string::npos) << err;
  EXPECT_EQ(tb::dbus::call_reload(tb::config::BusKind::Session, &err), CallResult::NoAgent);
}

TEST_F(StatusClientTest, NoBusIsNoAgent) {
  setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/tb-agent-test/bus", 1);
  Status got;
  std::string err;
  EXPECT_EQ(tb::dbus::read_status(tb::config::BusKind::Session, &got, &err), CallResult::NoAgent);
  EXPECT_NE(err.find("session bus"), std::string::npos) << err;
  EXPECT_EQ(tb::dbus::read_status(tb::config::BusKind::None, &got, &err), CallResult::NoAgent);
  EXPECT_NE(err.find("dbus.bus: none"), std::string::npos) << err;
}

TEST_F(StatusClientTest, ReloadWaitsForTheAnswer) {
  {
    ServedAgent agent(sample());
    ASSERT_TRUE(agent.ok());
    std::string err;
    EXPECT_EQ(tb::dbus::call_reload(tb::config::BusKind::Session, &err), CallResult::Ok) << err;
    EXPECT_EQ(agent.reloads(), 1);
  }
  const std::string problems =
      "/etc/tb-agent.yaml:3:9: unknown key 'hots'\n/etc/tb-agent.yaml:7:15: not a duration";
  ServedAgent refusing(sample(), problems);
  ASSERT_TRUE(refusing.ok());
  std::string err;
  EXPECT_EQ(tb::dbus::call_reload(tb::config::BusKind::Session, &err), CallResult::Refused);
  EXPECT_EQ(err, problems);
  EXPECT_EQ(refusing.reloads(), 1);
}

TEST(StatusReport, AgoIsShortAndNeverWraps) {
  using tb::daemon::format_ago;
  EXPECT_EQ(format_ago(0, kNow), "never");
  EXPECT_EQ(format_ago(kNow, kNow), "0 s ago");
  EXPECT_EQ(format_ago(kNow - 12'000'000, kNow), "12 s ago");
  EXPECT_EQ(format_ago(kNow - 119'999'999, kNow), "119 s ago");
  EXPECT_EQ(format_ago(kNow - 600'000'000, kNow), "10 min ago");
  EXPECT_EQ(format_ago(kNow - 3 * 3600'000'000ull, kNow), "3 h ago");
  EXPECT_EQ(format_ago(kNow - 5 * 86400'000'000ull, kNow), "5 d ago");
  EXPECT_EQ(format_ago(kNow + 5'000'000, kNow), "0 s ago");  // clock stepped back
}

TEST(StatusReport, SummaryNamesEverything) {
  EXPECT_EQ(tb::daemon::format_status(sample(), kNow),
            "       State: retrying (retrying in 4s: server answered 5.00; 12 reading(s) queued)\n"
            "      Device: pump-7 (provisioned)\n"
            "      Server: tb.example.com:5683\n"
            "    Readings: 12 queued, 34 sent, 5 dropped\n"
            "Last success: 12 s ago\n"
            "  Last error: server answered 5.00\n"
            "    Downlink: attributes observing, RPC retrying in 4s: no answer\n"
            "    Last RPC: restart_modem (id 3): ok\n"
            "      Remote: applied host_interval=\"10s\"\n"
            "     Sources: room (file, every 30s): 7 readings, 1 error, last read 3 s ago; error: "
            "cannot read /x: ENOENT\n"
            "              sensors (exec, every 1m): 0 readings, 0 errors, last read never\n");
}

TEST(StatusReport, SummaryOfAFreshAgent) {
  Status s;
  s.state = "unconfigured";
  s.status_text = "not configured: set provisioning in /etc/tb-agent.yaml";
  s.device_name = "gw";
  s.server = "tb:5683";
  const std::string out = tb::daemon::format_status(s, kNow);
  EXPECT_NE(out.find("State: unconfigured (not configured: set provisioning in "
                     "/etc/tb-agent.yaml)\n"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("gw (not provisioned)"), std::string::npos) << out;
  EXPECT_NE(out.find("Last success: never\n"), std::string::npos) << out;
  EXPECT_NE(out.find("Last error: none\n"), std::string::npos) << out;
  EXPECT_NE(out.find("Sources: none running\n"), std::string::npos) << out;
  EXPECT_NE(out.find("Downlink: not started\n"), std::string::npos) << out;
  // "failed: why" is shown once, not as "failed (failed: why)".
  s.state = "failed";
  s.status_text = "failed: provisioning refused";
  EXPECT_NE(tb::daemon::format_status(s, kNow).find("State: failed (provisioning refused)\n"),
            std::string::npos);
}

TEST(StatusReport, JsonCarriesTheSameFacts) {
  const auto j = nlohmann::json::parse(tb::daemon::format_status_json(sample(), kNow));
  EXPECT_EQ(j["state"], "retrying");
  EXPECT_EQ(j["status_text"], "retrying in 4s: server answered 5.00; 12 reading(s) queued");
  EXPECT_EQ(j["device_name"], "pump-7");
  EXPECT_EQ(j["provisioned"], true);
  EXPECT_EQ(j["server"], "tb.example.com:5683");
  EXPECT_EQ(j["queued_readings"], 12);
  EXPECT_EQ(j["sent_readings"], 34);
  EXPECT_EQ(j["dropped_readings"], 5);
  EXPECT_EQ(j["last_success_time_us"], kNow - 12'000'000);
  EXPECT_EQ(j["last_success_age_s"], 12);
  EXPECT_EQ(j["last_error"], "server answered 5.00");
  ASSERT_EQ(j["sources"].size(), 2u);
  EXPECT_EQ(j["sources"][0]["name"], "room");
  EXPECT_EQ(j["sources"][0]["type"], "file");
  EXPECT_EQ(j["sources"][0]["interval_us"], 30'000'000);
  EXPECT_EQ(j["sources"][0]["readings"], 7);
  EXPECT_EQ(j["sources"][0]["errors"], 1);
  EXPECT_EQ(j["sources"][0]["last_reading_age_s"], 3);
  EXPECT_EQ(j["sources"][0]["last_error"], "cannot read /x: ENOENT");
  EXPECT_TRUE(j["sources"][1]["last_reading_age_s"].is_null());
  EXPECT_EQ(j["attributes_observation"], "observing");
  EXPECT_EQ(j["rpc_observation"], "retrying in 4s: no answer");
  EXPECT_EQ(j["last_rpc"], "restart_modem (id 3): ok");
  EXPECT_EQ(j["last_remote_change"], "applied host_interval=\"10s\"");
  EXPECT_EQ(j["sources"][1]["last_reading_time_us"], 0);

  Status empty;
  const auto e = nlohmann::json::parse(tb::daemon::format_status_json(empty, kNow));
  EXPECT_TRUE(e["last_success_age_s"].is_null());
  EXPECT_TRUE(e["sources"].is_array());
  EXPECT_TRUE(e["sources"].empty());
  // Bytes that are not UTF-8 (a source's error may quote what it read) do not break the output.
  empty.last_error = "bad \xff byte";
  EXPECT_NO_THROW(nlohmann::json::parse(tb::daemon::format_status_json(empty, kNow)));
}

}  // namespace
