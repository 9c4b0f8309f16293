// tb::coap::Observer against the real tb-test-server on loopback (ThingsBoard's observe rules,
// docs/thingsboard-coap.md §2.3, §3.1): registration with a fresh token, many notifications,
// acknowledged at once, a newer registration ending the older, cancellation answered with RST,
// the end on 2.02 / an error / no answer, the payload bound, and a network reset.
#include "coap/observer.hpp"
#include "coap/subscription.hpp"

#include <gtest/gtest.h>
#include <systemd/sd-event.h>

#include <chrono>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_server_process.hpp"

namespace tb::coap {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;

const std::vector<std::string> kAttributes = {"api", "v1", "tok7", "attributes"};
const std::vector<std::string> kRpc = {"api", "v1", "tok7", "rpc"};

struct Seen {
  std::vector<Notification> notifications;
  std::vector<ObservationEnd> ends;
};

class ObserverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_GE(sd_event_new(&loop_), 0);
    server_ =
        std::make_unique<test::TestServer>(std::vector<std::string>{"--device", "pump-7=tok7"});
  }
  void TearDown() override {
    observer_.reset();
    server_.reset();
    sd_event_unref(loop_);
  }

  void make_observer(ObserverOptions o = {}) {
    std::string error;
    observer_ = Observer::create(loop_, Endpoint{"127.0.0.1", server_->port()}, o, &error);
    ASSERT_TRUE(observer_) << error;
  }

  ObservationId observe(const std::vector<std::string>& path, Seen& seen) {
    return observer_->observe(
        path, [&seen](const Notification& n) { seen.notifications.push_back(n); },
        [&seen](const ObservationEnd& e) { seen.ends.push_back(e); });
  }

  // Runs the loop until `done` (generous: the machine may be loaded).
  bool run_until(const std::function<bool()>& done, std::chrono::milliseconds limit = 20s) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!done()) {
      if (std::chrono::steady_clock::now() > end) return false;
      sd_event_run(loop_, 50'000);
    }
    return true;
  }
  // Runs the loop for a while (to show that nothing more arrives).
  void run_for(std::chrono::milliseconds d) {
    const auto end = std::chrono::steady_clock::now() + d;
    while (std::chrono::steady_clock::now() < end) sd_event_run(loop_, 50'000);
  }

  json observers() { return json::parse(server_->command("observers pump-7")); }

  sd_event* loop_ = nullptr;
  std::unique_ptr<test::TestServer> server_;
  std::unique_ptr<Observer> observer_;
};

TEST_F(ObserverTest, AttributeNotificationsArriveManyTimesAndAreAcknowledged) {
  make_observer();
  ASSERT_EQ(server_->command(R"(set-shared pump-7 {"interval":"30s"})"), "ok");
  Seen seen;
  observe(kAttributes, seen);
  ASSERT_TRUE(run_until([&] { return seen.notifications.size() == 1; }));
  EXPECT_TRUE(seen.notifications[0].first);
  EXPECT_EQ(seen.notifications[0].code, 205);
  EXPECT_EQ(json::parse(seen.notifications[0].payload), json({{"interval", "30s"}}));
  EXPECT_EQ(seen.notifications[0].sequence, 0u);

  for (int i = 1; i <= 3; ++i) {
    ASSERT_EQ(server_->command("set-shared pump-7 {\"n\":" + std::to_string(i) + "}"), "ok");
    ASSERT_TRUE(run_until([&] { return seen.notifications.size() == std::size_t(i) + 1; }));
    const Notification& n = seen.notifications.back();
    EXPECT_FALSE(n.first);
    EXPECT_EQ(json::parse(n.payload), json({{"n", i}}));
    EXPECT_EQ(n.sequence, std::uint32_t(i));
    EXPECT_EQ(n.content_format, 50);
    // Acknowledged at once: the server has no un-ACKed notification left.
    ASSERT_TRUE(run_until([&] { return observers()["attributes"]["unacked"] == false; }));
  }
  EXPECT_TRUE(seen.ends.empty());
  EXPECT_EQ(observer_->active(), 1u);
}

TEST_F(ObserverTest, RpcRegistrationIsAnsweredWithValidAndRequestsFollow) {
  make_observer();
  Seen seen;
  observe(kRpc, seen);
  ASSERT_TRUE(run_until([&] { return seen.notifications.size() == 1; }));
  EXPECT_EQ(seen.notifications[0].code, 203);  // §3.1: 2.03, empty
  EXPECT_TRUE(seen.notifications[0].first);
  EXPECT_TRUE(seen.notifications[0].payload.empty());
  ASSERT_EQ(server_->command(R"(rpc pump-7 getStatus 10000 {"verbose":true})"), "ok 0");
  ASSERT_TRUE(run_until([&] { return seen.notifications.size() == 2; }));
  const json body = json::parse(seen.notifications[1].payload);
  EXPECT_EQ(body["id"], 0);
  EXPECT_EQ(body["method"], "getStatus");
  EXPECT_EQ(body["params"], json({{"verbose", true}}));
  // The ACK marks it DELIVERED (§3.1).
  ASSERT_TRUE(run_until(
      [&] { return json::parse(server_->command("rpcs pump-7"))[0]["state"] == "DELIVERED"; }));
}

TEST_F(ObserverTest, EachRegistrationHasAFreshTokenAndTheNewerEndsTheOlder) {
  make_observer();
  Seen older, newer;
  observe(kAttributes, older);
  ASSERT_TRUE(run_until([&] { return older.notifications.size() == 1; }));
  const std::string first_token = observers()["attributes"]["token"];
  observe(kAttributes, newer);
  ASSERT_TRUE(run_until([&] { return newer.notifications.size() == 1 && older.ends.size() == 1; }));
  EXPECT_NE(observers()["attributes"]["token"], first_token);
  EXPECT_EQ(older.ends[0].reason, EndReason::Deleted);  // §2.3: 2.02 on the old token
  EXPECT_EQ(older.ends[0].code, 202);
  ASSERT_EQ(server_->command(R"(set-shared pump-7 {"x":1})"), "ok");
  ASSERT_TRUE(run_until([&] { return newer.notifications.size() == 2; }));
  EXPECT_EQ(older.notifications.size(), 1u);
  EXPECT_EQ(observer_->active(), 1u);
}

TEST_F(ObserverTest, ACanceledObservationIsSilentAndResetOnTheServer) {
  make_observer();
  Seen seen;
  const ObservationId id = observe(kAttributes, seen);
  ASSERT_TRUE(run_until([&] { return seen.notifications.size() == 1; }));
  observer_->cancel(id);
  EXPECT_EQ(observer_->active(), 0u);
  ASSERT_EQ(server_->command(R"(set-shared pump-7 {"x":1})"), "ok");
  // The notification is answered with RST, which cancels the observation (§2.3, RFC 7641 §3.6).
  ASSERT_TRUE(run_until([&] { return observers()["attributes"].is_null(); }));
  run_for(300ms);
  EXPECT_EQ(seen.notifications.size(), 1u);
  EXPECT_TRUE(seen.ends.empty());
}

TEST_F(ObserverTest, ServerEndingTheObservationEndsIt) {
  make_observer();
  Seen seen;
  observe(kRpc, seen);
  ASSERT_TRUE(run_until([&] { return seen.notifications.size() == 1; }));
  ASSERT_EQ(server_->command("end-observe pump-7 rpc"), "ok");
  ASSERT_TRUE(run_until([&] { return seen.ends.size() == 1; }));
  EXPECT_EQ(seen.ends[0].reason, EndReason::Deleted);
  EXPECT_EQ(observer_->active(), 0u);
  run_for(200ms);
  EXPECT_EQ(seen.ends.size(), 1u);  // exactly once
}

TEST_F(ObserverTest, AnErrorAnswerEndsTheObservation) {
  make_observer();
  Seen seen;
  observe({"api", "v1", "wrong-token", "attributes"}, seen);
  ASSERT_TRUE(run_until([&] { return seen.ends.size() == 1; }));
  EXPECT_EQ(seen.ends[0].reason, EndReason::Rejected);
  EXPECT_EQ(seen.ends[0].code, 401);
  EXPECT_TRUE(seen.notifications.empty());
}

TEST_F(ObserverTest, AnUnansweredRegistrationTimesOut) {
  ObserverOptions o;
  o.register_timeout = 1500ms;
  o.ack_timeout = 1s;
  make_observer(o);
  ASSERT_EQ(server_->command("drop-all on"), "ok");
  Seen seen;
  observe(kAttributes, seen);
  ASSERT_TRUE(run_until([&] { return seen.ends.size() == 1; }));
  EXPECT_EQ(seen.ends[0].reason, EndReason::Timeout);
  // The next registration goes out on a fresh socket and is not held behind the lost one.
  ASSERT_EQ(server_->command("drop-all off"), "ok");
  Seen again;
  observe(kAttributes, again);
  ASSERT_TRUE(run_until([&] { return again.notifications.size() == 1; }, 10s));
}

TEST_F(ObserverTest, ANotificationOverTheLimitIsDeliveredIncompleteAndTheObservationGoesOn) {
  ObserverOptions o;
  o.max_notification_body = 256;
  make_observer(o);
  Seen seen;
  observe(kAttributes, seen);
  ASSERT_TRUE(run_until([&] { return seen.notifications.size() == 1; }));
  ASSERT_EQ(server_->command("set-shared pump-7 {\"big\":\"" + std::string(600, 'x') + "\"}"),
            "ok");
  ASSERT_TRUE(run_until([&] { return seen.notifications.size() == 2; }));
  EXPECT_TRUE(seen.notifications[1].incomplete);
  EXPECT_TRUE(seen.notifications[1].payload.empty());
  // Acknowledged, and the observation goes on.
  ASSERT_TRUE(run_until([&] { return observers()["attributes"]["unacked"] == false; }));
  ASSERT_EQ(server_->command(R"(set-shared pump-7 {"small":1})"), "ok");
  ASSERT_TRUE(run_until([&] { return seen.notifications.size() == 3; }));
  EXPECT_FALSE(seen.notifications[2].incomplete);
  EXPECT_EQ(json::parse(seen.notifications[2].payload), json({{"small", 1}}));
  EXPECT_TRUE(seen.ends.empty());
}

TEST_F(ObserverTest, ResetNetworkEndsEveryObservationAndANewOneWorks) {
  make_observer();
  Seen a, r;
  observe(kAttributes, a);
  observe(kRpc, r);
  ASSERT_TRUE(
      run_until([&] { return a.notifications.size() == 1 && r.notifications.size() == 1; }));
  observer_->reset_network();
  ASSERT_TRUE(run_until([&] { return a.ends.size() == 1 && r.ends.size() == 1; }));
  EXPECT_EQ(a.ends[0].reason, EndReason::Network);
  Seen again;
  observe(kAttributes, again);
  ASSERT_TRUE(run_until([&] { return again.notifications.size() == 1; }));
  // A different socket: the server sees a new peer.
  ASSERT_EQ(server_->command(R"(set-shared pump-7 {"y":2})"), "ok");
  ASSERT_TRUE(run_until([&] { return again.notifications.size() == 2; }));
}

// After an outage each Subscription waits out its own backoff; the first registration answered
// proves the server reachable, and the other registers at once instead of up to an hour later.
TEST_F(ObserverTest, AnAnsweredRegistrationEndsTheOtherSubscriptionsBackoff) {
  ObserverOptions o;
  o.register_timeout = 1500ms;
  o.ack_timeout = 1s;
  make_observer(o);
  ASSERT_EQ(server_->command("drop-all on"), "ok");
  std::string attributes_state, rpc_state;
  Subscription attributes(
      loop_, *observer_, kAttributes, "attributes", SubscriptionOptions{2min, 1s, 1s},
      [](const Notification&) {}, [&](const std::string& s) { attributes_state = s; });
  // Backoff draws uniform(0, 1 h): this one would wait minutes on its own.
  Subscription rpc(
      loop_, *observer_, kRpc, "RPC", SubscriptionOptions{2min, 1h, 1h}, [](const Notification&) {},
      [&](const std::string& s) { rpc_state = s; });
  attributes.start();
  rpc.start();
  ASSERT_TRUE(run_until([&] {
    return attributes_state.rfind("retrying", 0) == 0 && rpc_state.rfind("retrying", 0) == 0;
  })) << attributes_state
      << " / " << rpc_state;
  const unsigned rpc_registrations = rpc.registrations();
  ASSERT_EQ(server_->command("drop-all off"), "ok");
  ASSERT_TRUE(
      run_until([&] { return attributes_state == "observing" && rpc_state == "observing"; }, 15s))
      << attributes_state << " / " << rpc_state;
  EXPECT_EQ(rpc.registrations(), rpc_registrations + 1);
  EXPECT_FALSE(observers()["rpc"].is_null());
}

// A registration refused (here 4.01 for an unknown token) is no proof of anything: the other
// subscription keeps its backoff, and two refused ones do not wake each other in a loop.
TEST_F(ObserverTest, ARefusedRegistrationDoesNotEndAnotherSubscriptionsBackoff) {
  make_observer();
  std::string refused_state, waiting_state;
  Subscription refused(
      loop_, *observer_, {"api", "v1", "unknown-token", "attributes"}, "attributes",
      SubscriptionOptions{2min, 1s, 1s}, [](const Notification&) {},
      [&](const std::string& s) { refused_state = s; });
  Subscription waiting(
      loop_, *observer_, {"api", "v1", "other-unknown", "rpc"}, "RPC",
      SubscriptionOptions{2min, 1h, 1h}, [](const Notification&) {},
      [&](const std::string& s) { waiting_state = s; });
  refused.start();
  waiting.start();
  ASSERT_TRUE(run_until([&] { return refused.registrations() >= 3; }));
  EXPECT_EQ(waiting.registrations(), 1u);
  EXPECT_EQ(waiting_state.rfind("retrying", 0), 0u) << waiting_state;
}

TEST_F(ObserverTest, CallbacksMayDestroyTheObserver) {
  make_observer();
  Seen seen;
  observer_->observe(
      kAttributes, [&](const Notification&) { observer_.reset(); },
      [&](const ObservationEnd&) { ADD_FAILURE() << "no end after destruction"; });
  ASSERT_TRUE(run_until([&] { return observer_ == nullptr; }));
  run_for(200ms);
}

}  // namespace
}  // namespace tb::coap
