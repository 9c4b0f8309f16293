#include "net/resolver.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include <gtest/gtest.h>

#include "private_dns.hpp"
#include "util/timer.hpp"

using namespace std::chrono_literals;
using tb::Millis;
using tb::net::Resolution;
using tb::net::Resolver;

namespace {

class ResolverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // As in the agent: SIGCHLD is blocked so sd-event can watch children.
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    ASSERT_EQ(sigprocmask(SIG_BLOCK, &mask, nullptr), 0);
    ASSERT_GE(sd_event_new(&loop_), 0);
    // Proof that the loop turns while a lookup runs: a timer every 20 ms.
    ticker_ = std::make_unique<tb::Timer>(
        loop_,
        [this] {
          ++ticks_;
          ticker_->arm_in(Millis(20));
        },
        Millis(1), CLOCK_MONOTONIC);
    ticker_->arm_in(Millis(20));
  }
  void TearDown() override {
    ticker_.reset();
    sd_event_unref(loop_);
  }

  // Runs the loop until `done` or the deadline; returns whether `done` became true.
  template <typename P>
  bool run_until(P done, std::chrono::milliseconds limit = 20s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      sd_event_run(loop_, 50000);
    }
    return true;
  }

  bool hang_dns(std::string* why) { return dns_.setup(why); }

  sd_event* loop_ = nullptr;
  std::unique_ptr<tb::Timer> ticker_;
  int ticks_ = 0;
  tb::testing::PrivateDns dns_;
};

bool gone(pid_t pid) {
  // A zombie still answers kill(pid, 0); a reaped child does not.
  return kill(pid, 0) != 0 && errno == ESRCH;
}

TEST_F(ResolverTest, LocalhostResolvesThroughAChildAndAnswersFromTheLoop) {
  Resolver r(loop_);
  std::optional<Resolution> got;
  r.resolve("localhost", 5683, 10s, [&](Resolution res) { got = std::move(res); });
  EXPECT_FALSE(got) << "the callback runs from the loop, never inside resolve()";
  const pid_t child = r.child_pid();
  EXPECT_GT(child, 0) << "a name is looked up in a child process";
  ASSERT_TRUE(run_until([&] { return got.has_value(); }));
  ASSERT_TRUE(got->ok()) << got->error;
  const std::string first = tb::net::to_string(got->addresses.front());
  EXPECT_TRUE(first == "127.0.0.1:5683" || first == "[::1]:5683") << first;
  EXPECT_FALSE(r.busy());
  EXPECT_TRUE(run_until([&] { return gone(child); }, 5s)) << "the child is reaped";
}

TEST_F(ResolverTest, ANumericAddressNeedsNoChild) {
  Resolver r(loop_);
  std::optional<Resolution> got;
  r.resolve("::1", 9, 10s, [&](Resolution res) { got = std::move(res); });
  EXPECT_EQ(r.child_pid(), 0);
  EXPECT_FALSE(got);
  ASSERT_TRUE(run_until([&] { return got.has_value(); }));
  ASSERT_TRUE(got->ok()) << got->error;
  EXPECT_EQ(tb::net::to_string(got->addresses.front()), "[::1]:9");
}

TEST_F(ResolverTest, AnUnknownNameFailsWithAReason) {
  std::string why;
  // Without our own resolv.conf the lookup would ask the machine's DNS servers.
  if (!hang_dns(&why)) GTEST_SKIP() << why;
  dns_.refuse();  // nothing listens: the query is refused at once (ICMP port unreachable)
  Resolver r(loop_);
  std::optional<Resolution> got;
  r.resolve("name.invalid", 5683, 20s, [&](Resolution res) { got = std::move(res); });
  ASSERT_TRUE(run_until([&] { return got.has_value(); }));
  EXPECT_FALSE(got->ok());
  EXPECT_FALSE(got->error.empty());
  EXPECT_EQ(got->error.find("no answer within"), std::string::npos) << got->error;
}

TEST_F(ResolverTest, AHangingLookupTimesOutWhileTheLoopTurns) {
  std::string why;
  if (!hang_dns(&why)) GTEST_SKIP() << why;
  Resolver r(loop_);
  std::optional<Resolution> got;
  const auto start = std::chrono::steady_clock::now();
  r.resolve("tb.example.com", 5683, 1500ms, [&](Resolution res) { got = std::move(res); });
  const pid_t child = r.child_pid();
  ASSERT_GT(child, 0);
  ASSERT_TRUE(run_until([&] { return got.has_value(); }));
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_FALSE(got->ok());
  EXPECT_NE(got->error.find("no answer within 1s500ms"), std::string::npos) << got->error;
  EXPECT_GE(took, 1400ms);
  EXPECT_LT(took, 15s) << "the lookup's own timeout ends it, not the DNS timeout (30 s)";
  // 1.5 s at 20 ms: the loop went on turning (generously below 75 ticks for a loaded machine).
  EXPECT_GE(ticks_, 20);
  EXPECT_TRUE(gone(child)) << "the hanging child is killed and reaped";
}

TEST_F(ResolverTest, DestroyingAResolverKillsAndReapsItsChild) {
  std::string why;
  if (!hang_dns(&why)) GTEST_SKIP() << why;
  bool called = false;
  pid_t child = 0;
  {
    Resolver r(loop_);
    r.resolve("tb.example.com", 5683, 60s, [&](Resolution) { called = true; });
    child = r.child_pid();
    ASSERT_GT(child, 0);
    ASSERT_TRUE(run_until([&] { return ticks_ >= 5; }));  // the child is in its DNS wait
    EXPECT_FALSE(gone(child));
  }
  EXPECT_TRUE(gone(child)) << "no child and no zombie left behind";
  run_until([&] { return ticks_ >= 10; });
  EXPECT_FALSE(called) << "a canceled lookup calls nothing";
}

TEST_F(ResolverTest, TheCallbackMayResolveAgain) {
  Resolver r(loop_);
  int answers = 0;
  r.resolve("localhost", 1, 10s, [&](Resolution first) {
    ++answers;
    EXPECT_TRUE(first.ok()) << first.error;
    r.resolve("127.0.0.1", 2, 10s, [&](Resolution second) {
      ++answers;
      ASSERT_TRUE(second.ok());
      EXPECT_EQ(tb::net::to_string(second.addresses.front()), "127.0.0.1:2");
    });
  });
  ASSERT_TRUE(run_until([&] { return answers == 2; }));
}

}  // namespace
