// daemon::Uploader with several requests in flight, against the real tb-test-server on loopback:
// every reading is stored once, two batches sharing a (ts, key) point are never in flight
// together, and the window shrinks on 5.00 and on timeouts (docs/performance.md).
#include "daemon/uploader.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>
#include <systemd/sd-event.h>
#include <nlohmann/json.hpp>

#include "coap/client.hpp"
#include "telemetry/queue.hpp"

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using nlohmann::json;

namespace tb::daemon {
namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/tb-uploader-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// tb-test-server as a child: port from its first line, control commands on its stdin.
class TestServer {
 public:
  explicit TestServer(const fs::path& dir) : record_(dir / "record.jsonl") {
    int in[2], out[2];
    if (pipe(in) != 0 || pipe(out) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(in[0], 0);
      dup2(out[1], 1);
      close(in[1]);
      close(out[0]);
      const std::string state = (dir / "state.json").string();
      execl(TB_TEST_SERVER_PATH, TB_TEST_SERVER_PATH, "--port", "0", "--quiet", "--state",
            state.c_str(), "--record", record_.c_str(), "--device", "dev=TOKEN",
            static_cast<char*>(nullptr));
      _exit(127);
    }
    close(in[0]);
    close(out[1]);
    control_ = fdopen(in[1], "w");
    replies_ = fdopen(out[0], "r");
    char line[256] = {};
    if (replies_ && std::fgets(line, sizeof line, replies_)) {
      const char* p = std::strrchr(line, ' ');
      port_ = static_cast<std::uint16_t>(std::atoi(p ? p + 1 : line));
    }
  }
  ~TestServer() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      waitpid(pid_, nullptr, 0);
    }
    if (control_) std::fclose(control_);
    if (replies_) std::fclose(replies_);
  }
  std::uint16_t port() const { return port_; }
  std::string ask(const std::string& cmd) {
    std::fprintf(control_, "%s\n", cmd.c_str());
    std::fflush(control_);
    char line[4096] = {};
    if (!std::fgets(line, sizeof line, replies_)) return {};
    std::string s = line;
    while (!s.empty() && s.back() == '\n') s.pop_back();
    return s;
  }
  std::vector<json> records() const {
    std::vector<json> out;
    std::ifstream in(record_);
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) out.push_back(json::parse(line));
    return out;
  }

 private:
  fs::path record_;
  pid_t pid_ = -1;
  FILE* control_ = nullptr;
  FILE* replies_ = nullptr;
  std::uint16_t port_ = 0;
};

using Point = std::tuple<std::string, std::int64_t>;  // key, ts

class UploaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(sd_event_new(&loop_), 0);
    server_ = std::make_unique<TestServer>(dir_.path);
    ASSERT_NE(server_->port(), 0) << "tb-test-server did not start";
    std::string warn, err;
    config::QueueConfig qc;
    queue_ = telemetry::Queue::open(dir_.path, qc, {telemetry::Sync::Normal}, &warn, &err);
    ASSERT_TRUE(queue_) << err;
    coap::ClientOptions co;
    co.request_timeout = 1s;
    client_ = coap::Client::create(loop_, {"127.0.0.1", server_->port()}, co, &err);
    ASSERT_TRUE(client_) << err;
  }
  void TearDown() override {
    uploader_.reset();
    client_.reset();
    queue_.reset();
    server_.reset();
    sd_event_unref(loop_);
  }

  void push(std::int64_t ts, std::vector<telemetry::Reading> readings) {
    std::string err;
    ASSERT_TRUE(queue_->push(telemetry::Record{ts, "test", std::move(readings)}, &err)) << err;
  }

  void make_uploader(unsigned max_in_flight) {
    config::DeliveryConfig dc;
    dc.max_in_flight = max_in_flight;
    dc.backoff_initial = 100ms;
    dc.backoff_max = 400ms;
    Uploader::Callbacks cb;
    cb.delivered = [this](std::uint64_t) {
      ++deliveries_;
      // Acks are coalesced: this runs once the loop has dispatched the answers of a wake-up,
      // after the uploader refilled the window, so in_flight() is what is in flight now.
      max_in_flight_seen_ = std::max(max_in_flight_seen_, uploader_->in_flight());
      max_window_ = std::max(max_window_, uploader_->window());
      reductions_at_last_success_ = uploader_->last_reduction().count;
      if (on_delivered_) on_delivered_();
    };
    cb.state_changed = [this](const DeliveryEvent& ev) {
      if (ev.state == DeliveryState::Retrying)
        failures_.push_back({ev.error, uploader_->window(), uploader_->last_reduction(),
                             reductions_at_last_success_});
    };
    uploader_ = std::make_unique<Uploader>(loop_, *queue_, dc, 0, cb);
  }

  bool run_until(const std::function<bool()>& pred, std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!pred()) {
      if (std::chrono::steady_clock::now() >= end) return false;
      sd_event_run(loop_, 50'000);
    }
    return true;
  }

  // Every 2.01 telemetry request the server stored, in arrival order.
  std::vector<json> stored() const {
    std::vector<json> out;
    for (auto& r : server_->records())
      if (r.value("feature", json()) == "telemetry" && r.value("code", json()) == "2.01")
        out.push_back(r);
    return out;
  }

  TempDir dir_;
  sd_event* loop_ = nullptr;
  std::unique_ptr<TestServer> server_;
  std::unique_ptr<telemetry::Queue> queue_;
  std::unique_ptr<coap::Client> client_;
  std::unique_ptr<Uploader> uploader_;
  std::size_t deliveries_ = 0;
  std::size_t max_in_flight_seen_ = 0;
  double max_window_ = 0;
  std::uint64_t reductions_at_last_success_ = 0;  // when the last success was reported
  std::function<void()> on_delivered_;
  struct Failure {
    std::string error;
    double window = 0;  // right after the failure
    Uploader::Reduction reduction;
    std::uint64_t reductions_before = 0;  // when the success before it was reported
  };
  std::vector<Failure> failures_;
};

// Pairs of records share a ts and a key ("v"), with different values: sent one after the other
// ThingsBoard keeps the later value. A pair split across two batches must not be in flight at
// once, or the earlier value could land last. The server answers 100 ms after each request, so
// two requests in flight together arrive less than 100 ms apart.
TEST_F(UploaderTest, BatchesSharingAPointAreNeverInFlightTogether) {
  constexpr std::int64_t kT0 = 1700000000000;
  constexpr int kRecords = 600;
  for (int i = 0; i < kRecords; ++i)
    push(kT0 + i / 2, {{"v", std::int64_t{i}}, {"w" + std::to_string(i % 7), std::int64_t{i}}});
  ASSERT_EQ(server_->ask("delay 100"), "ok");
  make_uploader(16);
  uploader_->start(client_.get(), "TOKEN");
  ASSERT_TRUE(run_until([&] { return queue_->queued_readings() == 0; }, 60s))
      << queue_->queued_readings() << " readings left";
  EXPECT_TRUE(failures_.empty()) << failures_.front().error;
  EXPECT_GE(max_in_flight_seen_, 3u) << "never more than one request in flight";

  const auto requests = stored();
  for (const auto& r : server_->records())
    EXPECT_NE(r.value("code", json()), "duplicate") << "a request was retransmitted: " << r.dump();
  std::map<Point, std::vector<std::size_t>> carriers;  // point -> requests that carried it
  std::map<Point, std::int64_t> last_value;            // in arrival order: what TB keeps
  std::size_t points = 0;
  for (std::size_t r = 0; r < requests.size(); ++r) {
    for (const auto& p : requests[r]["points"]) {
      const Point pt{p[0].get<std::string>(), p[1].get<std::int64_t>()};
      if (carriers[pt].empty() || carriers[pt].back() != r) carriers[pt].push_back(r);
      last_value[pt] = p[2].get<std::int64_t>();
      ++points;
    }
  }
  EXPECT_EQ(points, 2u * kRecords) << "every reading stored exactly once";
  for (const auto& [pt, rs] : carriers) {
    for (std::size_t k = 1; k < rs.size(); ++k) {
      const auto gap =
          requests[rs[k]]["t"].get<std::int64_t>() - requests[rs[k - 1]]["t"].get<std::int64_t>();
      EXPECT_GE(gap, 95) << std::get<0>(pt) << "@" << std::get<1>(pt)
                         << " was in two requests in flight together";
    }
  }
  for (int i = 1; i < kRecords; i += 2) {
    const Point pt{"v", kT0 + i / 2};
    EXPECT_EQ(last_value[pt], i) << "ts " << kT0 + i / 2;
  }
}

// RFC 8085 §3.1: the window halves on a 5.00 (ThingsBoard's rate-limit answer) and drops to one
// request on a timeout; nothing is lost either way.
TEST_F(UploaderTest, WindowHalvesOn500AndFallsToOneOnTimeout) {
  constexpr std::int64_t kT0 = 1700000000000;
  constexpr int kRecords = 6000;
  for (int i = 0; i < kRecords; ++i) push(kT0 + i, {{"v", std::int64_t{i}}});
  ASSERT_EQ(server_->ask("delay 20"), "ok");
  make_uploader(16);
  enum { kWarmUp, kAfter500, kDropping, kDone } phase = kWarmUp;
  on_delivered_ = [&] {
    if (phase == kWarmUp && uploader_->window() >= 8) {
      ASSERT_EQ(server_->ask("fail 1 5.00"), "ok");
      phase = kAfter500;
    }
  };
  uploader_->start(client_.get(), "TOKEN");
  ASSERT_TRUE(run_until([&] { return !failures_.empty(); }, 60s)) << "no 5.00 seen";
  EXPECT_NE(failures_[0].error.find("5.00"), std::string::npos) << failures_[0].error;
  const auto& first = failures_[0];
  EXPECT_GT(first.reduction.count, first.reductions_before) << "the 5.00 left the window as it was";
  EXPECT_EQ(first.reduction.to, first.window);
  EXPECT_GE(first.reduction.from, 8.0);
  EXPECT_LE(first.window, std::floor((first.reduction.from + 1) / 2))
      << "before: " << first.reduction.from;
  EXPECT_GE(first.window, 1.0);

  // Grow again, then lose everything: timeouts bring the window to one request.
  ASSERT_TRUE(run_until([&] { return uploader_->window() >= 4; }, 60s));
  ASSERT_EQ(server_->ask("drop-all on"), "ok");
  phase = kDropping;
  const std::size_t seen = failures_.size();
  ASSERT_TRUE(run_until(
      [&] {
        return failures_.size() > seen &&
               failures_.back().error.find("no answer") != std::string::npos;
      },
      20s));
  EXPECT_EQ(failures_.back().window, 1.0);
  ASSERT_EQ(server_->ask("drop-all off"), "ok");
  phase = kDone;
  ASSERT_TRUE(run_until([&] { return queue_->queued_readings() == 0; }, 120s))
      << queue_->queued_readings() << " readings left";

  std::set<std::int64_t> values;
  for (const auto& r : stored())
    for (const auto& p : r["points"]) values.insert(p[2].get<std::int64_t>());
  EXPECT_EQ(values.size(), static_cast<std::size_t>(kRecords)) << "a reading was lost";
}

// A window is earned by using it (RFC 7661): readings that come one at a time, each delivered
// before the next, use a window of one request and so grow it to two, never further; a backlog
// after a quiet spell starts low.
TEST_F(UploaderTest, ATrickleOfReadingsDoesNotGrowTheWindow) {
  make_uploader(16);
  uploader_->start(client_.get(), "TOKEN");
  for (int i = 0; i < 20; ++i) {
    push(1700000000000 + i, {{"v", std::int64_t{i}}});
    uploader_->flush_now();
    ASSERT_TRUE(run_until([&] { return queue_->queued_readings() == 0; }, 10s)) << i;
  }
  EXPECT_EQ(deliveries_, 20u);
  EXPECT_LE(uploader_->window(), 2.0);
}

// max_in_flight 1 is the RFC's NSTART 1: one request at a time, whatever happens.
TEST_F(UploaderTest, MaxInFlightOneIsOneAtATime) {
  for (int i = 0; i < 2000; ++i) push(1700000000000 + i, {{"v", std::int64_t{i}}});
  make_uploader(1);
  uploader_->start(client_.get(), "TOKEN");
  ASSERT_TRUE(run_until([&] { return queue_->queued_readings() == 0; }, 60s));
  EXPECT_EQ(max_in_flight_seen_, 1u);
  EXPECT_EQ(max_window_, 1.0);
}

// Issue 11: telemetry requests the server answered 4.01.
std::size_t unauthorized_telemetry(TestServer& server) {
  std::size_t n = 0;
  for (auto& r : server.records())
    if (r.value("code", json()) == "4.01") ++n;
  return n;
}

// With X.509 (no token: api/v1/telemetry) a 4.01 may be a stale identity (docs/thingsboard-coap.md
// §6.2): exactly one retry (on a fresh session), then unauthorized, the readings kept. The plain
// test server has no X.509 identity for anyone, so both answers are 4.01.
TEST_F(UploaderTest, X509FourOhOneIsRetriedOnceThenUnauthorized) {
  for (int i = 0; i < 5; ++i) push(1700000000000 + i, {{"v", std::int64_t{i}}});
  make_uploader(4);
  uploader_->start(client_.get(), "");
  ASSERT_TRUE(run_until([&] { return uploader_->state() == DeliveryState::Unauthorized; }, 10s));
  // Nothing more comes within the next backoff (probes wait for backoff_max, 400 ms here).
  run_until([] { return false; }, 300ms);
  EXPECT_EQ(unauthorized_telemetry(*server_), 2u);
  for (auto& r : server_->records()) {
    if (r.value("code", json()) != "4.01") continue;
    EXPECT_EQ(r.value("path", json()), "/api/v1/telemetry") << r.dump();
  }
  EXPECT_EQ(queue_->queued_readings(), 5u);
}

// With a token a 4.01 is final at once (no fresh-handshake retry).
TEST_F(UploaderTest, TokenFourOhOneIsUnauthorizedAtOnce) {
  for (int i = 0; i < 5; ++i) push(1700000000000 + i, {{"v", std::int64_t{i}}});
  make_uploader(4);
  uploader_->start(client_.get(), "NOT-A-TOKEN");
  ASSERT_TRUE(run_until([&] { return uploader_->state() == DeliveryState::Unauthorized; }, 10s));
  run_until([] { return false; }, 300ms);
  EXPECT_EQ(unauthorized_telemetry(*server_), 1u);
  EXPECT_EQ(queue_->queued_readings(), 5u);
}

// Coalesced acks (docs/performance.md): a batch the server took is removed from the queue only
// at the end of the loop wake-up. A kill -9 in between loses that removal, never a reading: the
// batch is still queued at the next start and is sent again (at-least-once).
TEST_F(UploaderTest, DeliveredBatchesNotYetAckedSurviveKill9AndAreSentAgain) {
  constexpr std::int64_t kT0 = 1700000000000;
  constexpr int kRecords = 3000;
  for (int i = 0; i < kRecords; ++i) push(kT0 + i, {{"v", std::int64_t{i}}});
  queue_.reset();  // the child opens its own: SQLite and sd-event are not shared across fork
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    sd_event* loop = nullptr;
    if (sd_event_new(&loop) < 0) _exit(2);
    std::string warn, err;
    auto q = telemetry::Queue::open(dir_.path, {}, {telemetry::Sync::Normal}, &warn, &err);
    auto c = coap::Client::create(loop, {"127.0.0.1", server_->port()}, {}, &err);
    if (!q || !c) _exit(3);
    config::DeliveryConfig dc;
    dc.max_in_flight = 16;
    Uploader up(loop, *q, dc, 0, {});
    up.start(c.get(), "TOKEN");
    // One source per sd_event_run: stop right after an answer, before the acks' idle source ran.
    for (int i = 0; i < 200000; ++i) {
      if (sd_event_run(loop, 50'000) < 0) _exit(4);
      if (up.unacked() > 0 && q->queued_readings() < kRecords) kill(getpid(), SIGKILL);
    }
    _exit(5);
  }
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exit status " << WEXITSTATUS(status);

  std::set<std::int64_t> at_server;
  for (const auto& r : stored())
    for (const auto& p : r["points"]) at_server.insert(p[2].get<std::int64_t>());
  std::string warn, err;
  queue_ = telemetry::Queue::open(dir_.path, {}, {telemetry::Sync::Normal}, &warn, &err);
  ASSERT_TRUE(queue_) << err;
  std::set<std::int64_t> queued;
  {
    std::vector<telemetry::Batch> taken;
    for (auto b = queue_->next_batch(1 << 20); !b.empty(); b = queue_->next_batch(1 << 20)) {
      for (const auto& e : json::parse(b.payload)) queued.insert(e["values"]["v"].get<int>());
      taken.push_back(std::move(b));
    }
    for (const auto& b : taken) queue_->release(b);
  }
  std::size_t both = 0;
  for (int i = 0; i < kRecords; ++i) {
    ASSERT_TRUE(at_server.count(i) || queued.count(i)) << "reading " << i << " was lost";
    both += at_server.count(i) && queued.count(i);
  }
  EXPECT_GT(both, 0u) << "no delivered batch was waiting for its ack when the agent died";

  make_uploader(16);
  uploader_->start(client_.get(), "TOKEN");
  ASSERT_TRUE(run_until([&] { return queue_->queued_readings() == 0; }, 60s))
      << queue_->queued_readings() << " readings left";
  std::set<std::int64_t> values;
  for (const auto& r : stored())
    for (const auto& p : r["points"]) values.insert(p[2].get<std::int64_t>());
  EXPECT_EQ(values.size(), static_cast<std::size_t>(kRecords)) << "a reading was lost";
}

}  // namespace
}  // namespace tb::daemon
